"""eftmesh's lab: what builds, measures and load-tests the mesh, none of which serves.

    eftmesh_lab.demo          the demo family: data (world, corpus, chat_format), training, make models / make eval
    eftmesh_lab.bench         make bench: mesh vs in-process EFT tokens/s
    eftmesh_lab.bench_load    make bench-load: tokens/s and latencies under concurrent generations
    eftmesh_lab.bench_vocab   make bench-vocab: combiner cost and wire bytes at real vocabulary sizes
    eftmesh_lab.loadtest      eftmesh-load / make load: the ghz scenario files in load_tests/, without ghz

It is a second distribution (tools/lab/pyproject.toml, `eftmesh-lab`) rather than a package
inside `eftmesh` or an extra of it, so the serving package and the images built from services/
never contain training code, benchmarks or plotting (matplotlib), and `eftmesh` cannot import
any of it: tests/test_packaging.py checks both. The lab depends on `eftmesh`, never the reverse.
"""
