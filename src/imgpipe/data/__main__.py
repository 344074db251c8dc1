"""``python -m imgpipe.data OUT_DIR``: export the sample digits into OUT_DIR (``make data``)."""

from imgpipe.data.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
