"""``tdsteer extract-images``: a steering vector from two folders of images and a timm model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from timm.data import create_transform, resolve_data_config

import tdsteer
from tdsteer.cli import CLIError, Command, parse_device, parse_layers, positive_int, save_extracted
from tdsteer.indices import take_indices
from tdsteer_timm.arch import DEFAULT_KIND, SITE_KINDS
from tdsteer_timm.cli.images import folder_batches, image_files
from tdsteer_timm.cli.models import create, load_checkpoint
from tdsteer_timm.description import describe

METHODS = ("mean_diff", "pca_diff", "pca_center", "probe")
PAIRED_METHODS = ("pca_diff", "pca_center")
READS = ("cls", "patch_mean", "spatial_mean", "mean")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="timm model name, e.g. resnet50 or vit_small_patch16_224 (timm.list_models())"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights to load (.safetensors or .pth); the model is built offline, so without it the weights are random",
    )
    parser.add_argument("--positive", required=True, help="folder of images that show the concept")
    parser.add_argument("--negative", required=True, help="folder of images that do not")
    parser.add_argument(
        "--layers", default=None, help="layers of --kind: 6,7 or -1 or 2:5 or all (default: -1, the last)"
    )
    parser.add_argument(
        "--kind", choices=SITE_KINDS, default=DEFAULT_KIND, help="block (every block) or stage (default: block)"
    )
    parser.add_argument(
        "--method", choices=METHODS, default="mean_diff", help="aggregation method (default: mean_diff)"
    )
    parser.add_argument(
        "--read",
        choices=READS,
        default=None,
        help=(
            "what one image gives: cls (the class token of a ViT), patch_mean / spatial_mean (mean over the patches "
            "or the feature map), mean (over every token) (default: cls for models with a class token, else "
            "spatial_mean)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images of each folder per batch (default: 16)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input resolution in pixels (default: the model's own)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )
    parser.add_argument("-o", "--output", required=True, help="where to write the vector (.safetensors)")


def default_read(sites: Sequence[tdsteer.Site]) -> str:
    """``cls`` when every site is a token sequence with a class token, else a mean over the patches or the map."""
    if all(site.layout == "NLC" and site.prefix_tokens > 0 for site in sites):
        return "cls"
    return "patch_mean" if all(site.layout == "NLC" for site in sites) else "spatial_mean"


def check_read(read: str, sites: Sequence[tdsteer.Site]) -> None:
    """Refuse ``--read cls`` where there is no class token to read.

    Raises:
        CLIError: A site is a feature map, or a token sequence without prefix tokens.
    """
    if read != "cls":
        return
    for site in sites:
        if site.layout != "NLC":
            problem = f"is a feature map (layout {site.layout})"
        elif site.prefix_tokens == 0:
            problem = "has no class token (prefix_tokens=0)"
        else:
            continue
        raise CLIError(
            f"--read cls reads the class token, but site {site.key!r} {problem}; use --read {default_read(sites)}"
        )


def _run(args: argparse.Namespace) -> int:
    batch_size = positive_int("--batch-size", args.batch_size)
    image_size = None if args.image_size is None else positive_int("--image-size", args.image_size)
    chosen = parse_layers(args.layers)
    layers = [-1] if chosen is None else chosen
    positive = image_files(args.positive, "--positive")  # before the model: a bad folder fails fast
    negative = image_files(args.negative, "--negative")
    device = parse_device(args.device)
    model = create(args.model, image_size)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model.to(device)

    description = describe(model)
    sites = description.select(layers, args.kind)
    indices = take_indices(description.num_layers(args.kind), layers, what=args.kind)
    read = args.read or default_read(sites)
    check_read(read, sites)
    overrides = {} if image_size is None else {"input_size": (3, image_size, image_size)}
    config = resolve_data_config(overrides, model=model)
    transform = create_transform(**config, is_training=False)
    batches = folder_batches(positive, negative, transform, batch_size, paired=args.method in PAIRED_METHODS)

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        vector = tdsteer.extract(
            model, batches, sites, method=args.method, read=read, progress=progress, model_name=args.model
        )
    except AssertionError as error:  # timm checks the input size with assert
        raise CLIError(f"{args.model} refused the images: {error}; check --image-size") from None
    save_extracted(
        vector,
        args.output,
        read=read,
        data=f"{len(positive)} positive and {len(negative)} negative images",
        site_kind=args.kind,
        layers=indices,
        image_size=list(config["input_size"][1:]),
        positive_images=len(positive),
        negative_images=len(negative),
        positive_dir=str(args.positive),
        negative_dir=str(args.negative),
        checkpoint=None if args.checkpoint is None else str(args.checkpoint),
    )
    return 0


COMMAND = Command(
    name="extract-images",
    help="extract a steering vector from two folders of images with a timm model",
    description=(
        "Extract a steering vector from a folder of images that show a concept (--positive) and one of images that "
        "do not (--negative), read at the chosen blocks or stages of a timm model. The model is built offline "
        "(pretrained=False); give its weights with --checkpoint. Images go through the model's eval transform "
        "(timm.data.resolve_data_config and create_transform)."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--layers",),
)
