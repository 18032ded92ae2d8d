"""The tiny world and the tooling around the core library: an offline text-to-image model and CLIP pre-trained here on
scikit-learn's digits, the demo's report, alignment metrics and the benchmarks' helpers.

    world         the tiny world: its pre-training, the shipped weights (`tiny_world_paths`) and their card
    checks        sanity checks of the tiny world (probe fidelity, LoRA fine-tunes, linear probes)
    digits        the bundled data: scikit-learn's digits as a `datasets.DatasetDict`
    report        the end-to-end demo's report (accuracy and alignment tables, figures, image grids)
    alignment     Frechet distance and k-NN precision/recall between real and synthetic features
    benchmarking  helpers of `benchmarks/`: timers, memory, stand-in adapters, a random SD 2.1-base
"""
