"""lm-eval task configs (``<task>.yaml``) of the seven zero-shot tasks over local files, and the converters
(``convert.py``) that give the local rows the hub versions' fields. Loaded by ``wanda.eval.zeroshot``."""
