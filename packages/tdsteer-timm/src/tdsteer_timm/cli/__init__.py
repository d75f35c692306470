"""The ``tdsteer`` subcommand and model source that tdsteer-timm adds (entry-point groups
``tdsteer.commands`` and ``tdsteer.model_sources``).

Examples:
    From a shell::

        tdsteer extract-images --model vit_small_patch16_224 --checkpoint vit.safetensors \\
            --positive images/smiling --negative images/neutral -o smile.safetensors
        tdsteer info --model resnet50     # how tdsteer_timm sees the model (weights not read)
"""
