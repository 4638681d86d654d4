"""`torchrun --standalone --nproc-per-node N -m llmbook.torch_tp --prompt "..."`: every rank
runs llmbook.torch_tp.run.main (chapter 13)."""
import sys

from .run import main

sys.exit(main())
