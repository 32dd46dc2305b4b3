"""Model file importers: Caffe and ONNX files into the one model representation (``models.ir``)."""
