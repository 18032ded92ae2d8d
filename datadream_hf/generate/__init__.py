"""Stage 2 of DataDream: generate the synthetic dataset with the stage-1 adapters (or the frozen base model).

    config    `GenerationConfig`: how images are sampled (defaults the reference's), and the input errors
    adapters  the stage-1 adapters as stage 2 sees them: found locally or on the Hub, checked, fused in and out
    sampling  the pipeline and `SyntheticImageSampler`: image k of class c from its own seed, alone or batched
    fusion    LoFT's pairs: which two per-image adapters make each image, served many pairs per batched call
    shards    the generation loop: this process's shards, sampled and written in the background
    dataset   the finished dataset: sample grid, card, `save_to_disk` copy, Hub upload
    run       `generate_synthetic_dataset`: the whole stage, resumable, split across processes

The folder it writes, and the `datasets` builder that reads it, are the stage-2 -> stage-3 contract: `synthetic`.
"""
