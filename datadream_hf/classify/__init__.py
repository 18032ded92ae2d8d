"""Stage 3 of DataDream: fine-tune CLIP (or SigLIP, or an image-classification model) with LoRA on the real K-shot
images and the synthetic ones, with the loss lambda * CE(real) + (1 - lambda) * CE(synthetic).

    config       `ClassifierArguments` (model, LoRA, data, prompts) and `DataDreamTrainingArguments`
    backbones/   the classifier kinds behind one interface: dual encoders (CLIP, SigLIP, ...: the head is the
                 class-prompt text embeddings) and image-classification models (ViT, ConvNeXt, ...), picked from the
                 model's config; `load_trained_classifier` reloads any saved one
    modeling     `CLIPLoRAClassifier`: the paper's classifier, CLIP + LoRA on both towers
    data         the real + synthetic training set, its batch sampler (fixed real/synthetic counts), the collator
    augment      the reference's training augmentation (PIL), the eval transform, MixUp/CutMix
    trainer      `MixedRealSyntheticTrainer`: the Trainer that mixes the batches and the loss
    checkpoints  which Trainer checkpoints are complete; refusing a folder that holds another run
    metrics/     the local `evaluate` accuracy metric and the per-split classification report
    outputs      the run record, report and model card of an output folder
    train        `train_classifier`: the whole stage, from the arguments to a finished output folder
"""
