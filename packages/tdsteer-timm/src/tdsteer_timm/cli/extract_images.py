"""``tdsteer extract-images``: a steering vector from two folders of images and a timm model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from timm.data import create_transform, resolve_data_config

import tdsteer
from tdsteer.cli import CLIError, Command, output_file, parse_device, parse_layers, positive_int, save_extracted
from tdsteer.cli.command import SUMMARIES
from tdsteer.indices import take_indices
from tdsteer_timm.arch import DEFAULT_KIND, SITE_KINDS
from tdsteer_timm.cli.images import folder_batches, image_files
from tdsteer_timm.cli.models import architecture_name, create, load_checkpoint
from tdsteer_timm.description import describe_model
from tdsteer_timm.features import model_class_name

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
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="build the backbone alone (timm's features_only=True), e.g. to load a features_only checkpoint",
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
            "or the feature map, after any class or register tokens), mean (over every token) (default: cls for "
            "models with a class token, patch_mean for other token sequences, else spatial_mean)"
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


def default_read(sites: Sequence[tdsteer.Site], class_token: bool = True) -> str:
    """``cls`` when every site is a token sequence that starts with a class token, else a mean over the
    patches (token sequences) or over the map (feature maps).

    Examples:
        >>> vit = [tdsteer.Site("blocks.0", layout="NLC", prefix_tokens=1)]
        >>> default_read(vit), default_read(vit, class_token=False), default_read([tdsteer.Site("x", layout="NCHW")])
        ('cls', 'patch_mean', 'spatial_mean')
    """
    if class_token and all(site.layout == "NLC" and site.prefix_tokens > 0 for site in sites):
        return "cls"
    return "patch_mean" if all(site.layout == "NLC" for site in sites) else "spatial_mean"


def check_read(read: str, sites: Sequence[tdsteer.Site], class_token: bool = True) -> None:
    """Refuse ``--read cls`` where there is no class token to read.

    Args:
        read: The ``--read`` value.
        sites: The chosen sites.
        class_token: Whether the model's token sequences start with a class token (``False`` for
            SigLIP-style ViTs and ViTs with registers only).

    Raises:
        CLIError: A site is a feature map, a token sequence without prefix tokens (CaiT and XCiT
            blocks, SigLIP-style ViTs), or the prefix tokens are registers, not a class token.
    """
    if read != "cls":
        return
    for site in sites:
        if site.layout != "NLC":
            problem = f"is a feature map (layout {site.layout})"
        elif site.prefix_tokens == 0:
            problem = "has no class token (prefix_tokens=0)"
        elif not class_token:
            problem = f"starts with {site.prefix_tokens} register tokens, not a class token"
        else:
            continue
        alternatives = "--read patch_mean or --read mean" if site.layout == "NLC" else "--read spatial_mean"
        raise CLIError(f"--read cls reads the class token, but site {site.key!r} {problem}; use {alternatives}")


def _run(args: argparse.Namespace) -> int:
    batch_size = positive_int("--batch-size", args.batch_size)
    image_size = None if args.image_size is None else positive_int("--image-size", args.image_size)
    chosen = parse_layers(args.layers)
    layers = [-1] if chosen is None else chosen
    positive = image_files(args.positive, "--positive")  # before the model: a bad folder fails fast
    negative = image_files(args.negative, "--negative")
    device = parse_device(args.device)
    output_file(args.output)
    model = create(args.model, image_size, features_only=args.features_only)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint, image_size=image_size)
    model.to(device)

    resolved = describe_model(model, True)
    description = resolved.description
    sites = description.select(layers, args.kind)
    indices = take_indices(description.num_layers(args.kind), layers, what=args.kind)
    read = args.read or default_read(sites, resolved.class_token)
    check_read(read, sites, resolved.class_token)
    overrides = {} if image_size is None else {"input_size": (3, image_size, image_size)}
    config = resolve_data_config(overrides, model=model)
    transform = create_transform(**config, is_training=False)
    batches = folder_batches(positive, negative, transform, batch_size, paired=args.method in PAIRED_METHODS)

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        vector = tdsteer.extract(
            model, batches, sites, method=args.method, read=read, progress=progress, model_name=architecture_name(model)
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
        timm_model=args.model,
        timm_family=description.architecture,
        timm_class=model_class_name(model),
        features_only=bool(args.features_only),
    )
    return 0


COMMAND = Command(
    name="extract-images",
    help=SUMMARIES["extract-images"],
    description=(
        "Extract a steering vector from a folder of images that show a concept (--positive) and one of images that "
        "do not (--negative), read at the chosen blocks or stages of a timm model. The model is built offline "
        "(pretrained=False); give its weights with --checkpoint. Images go through the model's eval transform "
        "(timm.data.resolve_data_config and create_transform). Stages are numbered as timm's forward_intermediates "
        "numbers them (ResNet's stage 0 is the stem). The vector records the timm architecture (model_name) and "
        "the channels of each site."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--layers",),
)
