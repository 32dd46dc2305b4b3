"""Which metric names a PromQL expression refers to (enough of PromQL for our files)."""

from __future__ import annotations

import re

FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min", "count",
    "count_over_time", "delta", "deriv", "exp", "floor", "histogram_quantile", "increase", "irate",
    "label_replace", "label_values", "last_over_time", "ln", "max", "max_over_time", "min",
    "min_over_time", "quantile", "quantile_over_time", "rate", "round", "scalar", "sort", "sort_desc",
    "sqrt", "stddev", "sum", "sum_over_time", "time", "topk", "vector",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, $__rate_interval included
    text = re.sub(r"\$\w+", "", text)  # dashboard variables
    names = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {n for n in names if n not in FUNCTIONS and n not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]?", n)}
