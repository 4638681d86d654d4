"""SmolLM2 compiled with Apache TVM Relax (chapter 6).

model.py, pipeline.py, convert.py and runner.py are exported from notebooks/06_tvm.ipynb;
build.py (the on-disk cache of compiled libraries) is plain glue.
"""
