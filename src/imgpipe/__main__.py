"""``python -m imgpipe`` is the ``imgpipe`` command (for a venv whose scripts are not on PATH)."""

from imgpipe.commands import main

main(prog_name="imgpipe")
