"""``python -m ddfm_fast`` is the ``ddfm-fast`` command."""

from ddfm_fast.cli import main

main(prog_name="ddfm-fast")
