"""Grouped cls training: several classes' adapters in one model and one forward pass per step, each equal to its
sequential run up to float rounding.

    lora   the per-class LoRA stacks swapped in for peft's layers, each sample routed to its class's factors
    optim  AdamW and fp16 loss scaling with a step count and a scale per class
    loop   the grouped loop: per-class batches, checkpoints and exports in the sequential path's format; a group
           that runs out of memory is halved
    plan   which classes train together: the run's deterministic groups, and their continuation on resume
    sizing the group size: forced, reused on resume, or measured against the free memory (`--cls_strategy auto`)
"""
