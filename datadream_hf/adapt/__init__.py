"""Stage 1 of DataDream: LoRA-adapt Stable Diffusion on the K-shot images, one adapter per class (`cls`), one for
the whole dataset (`dset`) or one per image (`image`, LoFT).

    config        `GeneratorTrainingConfig`, the flags of `train_datadream_lora.py`; defaults are the paper's or the
                  mode's
    modes/        dset, cls, image: which K-shot images train which adapter, and each mode's defaults
    data          the K-shot images as training units, and every random draw of a step, seeded by (unit, step)
    latent_cache  VAE posteriors of the few-shot crops, encoded once instead of at every step
    modeling      the frozen base model + LoRA, its init, the diffusion loss, the optimizer, the adapter file
    checkpoints   an adapter's `checkpoint-<step>` folders (safetensors + JSON)
    sequential    the loop that trains one adapter
    grouped/      several classes' (or images') adapters in one forward pass (`--cls_strategy auto`, the default),
                  groups sized to the free memory
    validation    an adapter's validation samples, and the replay of other processes' classes into the trackers
    outputs       the output folder (the stage-1 -> stage-2 contract): run record, index, card, Hub push
    train         `train_generator`: the whole stage, from the few-shot data to a finished output folder
"""
