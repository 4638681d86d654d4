"""SmolLM2 compiled with Apache TVM Relax (chapters 6, 9 and 10).

Every model class here lays out its own weights (`weights_from(bundle)`), so one backend
(llmbook.backends.tvm) builds any of them, and one runner (runner.py) drives them all: one
sequence is a batch of one.

    model.py, pipeline.py, convert.py, runner.py, unfused.py, tiled.py   chapter 6
    q4.py, attention.py                                                  chapter 9
    batch.py                                                             chapter 10

They are exported from those notebooks; build.py (the on-disk cache of compiled libraries) is
plain glue.
"""
