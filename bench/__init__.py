"""The benchmarks: the pipeline measured against naive baselines and the hardware's limits.

Run from the project root (`make bench` runs the first line):
    python -m bench                       # the main table: processing, training, tracking,
                                          # sweeps, start-up (bench/pipeline.py)
    python -m bench --smoke               # the main table at tiny sizes (the tests run this)
    python -m bench decode [--smoke]      # one section: python -m bench SECTION [its options]
    python -m bench --list                # every section, one line each

Timings are reported, never asserted. bench/RESULTS.md holds the tables only (each
section between its markers, rewritten by its own run); bench/NOTES.md holds the reasoning
behind them, written once.

Adding a section (say ``models``):
1. write ``bench/models.py`` with a module docstring and ``main(argv: list[str] | None) -> int``
   that parses its own options (``--smoke``: tiny sizes, every row, no RESULTS.md);
2. write its table with ``bench.sections.write_section("models", "Models", intro, rows, data)``,
   which replaces that section of RESULTS.md and keeps the others;
3. add one line to ``SECTIONS`` below (the name is the module's), and a smoke test in
   tests/test_bench.py (``run_bench("models", "--smoke", out=tmp_path)``).
Shared pieces: ``bench.dataset`` (the scaled raw dataset), ``bench.measure`` (timers, peak
memory, the machine), ``bench.baselines`` (the naive ways and the limits), ``bench.runs``
(the main table's runs, ``bench_training`` among them), ``imgpipe.testing`` (servers, project
copies, entry points).
"""

# name -> what it measures; each is the module bench/<name>.py, run as `python -m bench <name>`.
SECTIONS: dict[str, str] = {
    "pipeline": "the main table: processing, training, tracking, sweeps, start-up",
    "decode": "the decoders' tight loops, and process_data against them",
    "streaming": "streaming training against the in-memory path: speed, peak memory",
    "ddp": "DDP on the CPU: processes against threads, start-up",
    "gpu": "everything a GPU changes (on a CUDA machine)",
    "models": "augmentation cost, and a timm epoch through the stage against a bare loop",
    "sweep": "sweeps: pruning against none, 1 against 2 journal workers",
    "predict": "the predict stage and the server against bare loops; tracking's share of make train",
}
DEFAULT = "pipeline"
