"""Generated stubs of the Caffe and ONNX file formats' subsets (see proto/generate.py)."""
