"""The ``tdsteer`` subcommands of tdsteer-hf: ``extract``, ``generate`` and ``demo`` for text models,
and the model source that lets ``tdsteer info --model`` open Hugging Face models.

They are found through entry points (``tdsteer.commands``, ``tdsteer.model_sources``); the program
itself, its shared argument types and its error policy belong to :mod:`tdsteer.cli`.
"""
