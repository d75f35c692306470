"""The command line that tdsteer-timm adds: ``tdsteer extract-images`` and ``tdsteer info --model`` for timm names."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import tdsteer
import tdsteer_timm
from tdsteer.cli import NO, SURE, CLIError, main
from tdsteer_timm.cli.extract_images import check_read, default_read
from tdsteer_timm.cli.models import create, load_checkpoint
from tdsteer_timm.cli.source import SOURCE

TINY = "resnet10t"  # 5M parameters; at 32 pixels a forward takes milliseconds on a CPU


def _folder(path: Path, count: int, brightness: float, seed: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = (rng.random((40, 40, 3)) * 255 * brightness).astype("uint8")
        Image.fromarray(pixels).save(path / f"{index}.png")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    return _folder(tmp_path / "positive", 3, 1.0, 0), _folder(tmp_path / "negative", 3, 0.3, 1)


def _extract(folders: tuple[Path, Path], output: Path, *extra: str, model: str = TINY) -> int:
    positive, negative = folders
    return main(
        ["extract-images", "--model", model, "--positive", str(positive), "--negative", str(negative)]
        + ["--image-size", "32", "--device", "cpu", "--no-progress", *extra, "-o", str(output)]
    )


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    # another distribution's command that fails to load warns first; that is not this error's output
    err = "\n".join(line for line in lines if not line.startswith("tdsteer: warning: cannot load the"))
    assert err.startswith("tdsteer: error:") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_extract_images_end_to_end(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    output = tmp_path / "vec.safetensors"
    assert _extract(folders, output) == 0
    assert "Extracted vector: method mean_diff, read spatial_mean" in capsys.readouterr().out
    vector = tdsteer.SteeringVector.load(output)
    description = tdsteer_timm.describe(timm.create_model(TINY, pretrained=False))
    last = description.of_kind("block")[-1]
    assert vector.keys() == [last.site.key]  # default: the last block
    assert vector[last.site.key].shape == (last.num_chs,) and vector[last.site.key].norm() > 0
    assert vector.sites[last.site.key].layout == "NCHW"
    assert vector.metadata["read"] == "spatial_mean" and vector.metadata["site_kind"] == "block"
    assert vector.metadata["layers"] == [description.num_layers() - 1]
    assert vector.metadata["positive_images"] == 3 and vector.metadata["image_size"] == [32, 32]


def test_extract_images_stages_with_a_checkpoint(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = timm.create_model(TINY, pretrained=False, num_classes=3)  # a fine-tuned head: resized on load
    checkpoint = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    output = tmp_path / "vec.safetensors"
    code = _extract(folders, output, "--kind", "stage", "--layers", "-2:", "--checkpoint", str(checkpoint))
    assert code == 0, capsys.readouterr().err
    vector = tdsteer.SteeringVector.load(output)
    stages = tdsteer_timm.describe(model).of_kind("stage")
    assert vector.keys() == [stages[-2].site.key, stages[-1].site.key]
    assert [vector[s.site.key].shape[0] for s in stages[-2:]] == [s.num_chs for s in stages[-2:]]
    assert vector.metadata["layers"] == [len(stages) - 2, len(stages) - 1]


def test_extract_images_vit_reads_the_class_token(folders: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "vec.safetensors"
    assert _extract(folders, output, "--layers", "0", model="vit_tiny_patch16_224") == 0
    vector = tdsteer.SteeringVector.load(output)
    assert vector.metadata["read"] == "cls" and vector.keys() == ["blocks.0"]
    assert vector["blocks.0"].shape == (192,) and vector.sites["blocks.0"].prefix_tokens == 1


def test_unequal_folders_pair_only_when_the_method_needs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = _folder(tmp_path / "p", 3, 1.0, 0), _folder(tmp_path / "n", 2, 0.3, 1)
    assert _extract(folders, tmp_path / "v.safetensors", "--batch-size", "2") == 0
    assert "3 positive and 2 negative images" in capsys.readouterr().out
    assert _extract(folders, tmp_path / "v.safetensors", "--method", "pca_diff") == 2
    _one_line_error(capsys, "pairs images", "--positive has 3 and --negative 2")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"--positive": "empty"}, ["--positive", "no images"]),
        ({"--negative": "missing"}, ["--negative", "no such folder"]),
        ({"--model": "no_such_model_x"}, ["unknown timm model 'no_such_model_x'", "timm.list_models()"]),
        ({"--layers": "9"}, ["layer index 9 is out of range", "4 layers"]),
        ({"--read": "cls"}, ["--read cls", "feature map"]),
        ({"--batch-size": "0"}, ["--batch-size must be at least 1"]),
        ({"--checkpoint": "missing.pth"}, ["--checkpoint", "no such file"]),
    ],
    ids=["empty-folder", "missing-folder", "unknown-model", "layer-range", "cls-on-cnn", "batch-size", "checkpoint"],
)
def test_bad_input_exits_2_with_one_line(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    words: list[str],
) -> None:
    (tmp_path / "empty").mkdir()
    values = {"--model": TINY, "--positive": str(folders[0]), "--negative": str(folders[1])}
    for option, value in change.items():
        values[option] = value if option in ("--model", "--layers", "--read", "--batch-size") else str(tmp_path / value)
    argv = ["extract-images"] + [part for option, value in values.items() for part in (option, value)]
    output = tmp_path / "vec.safetensors"
    assert main([*argv, "--image-size", "32", "--no-progress", "-o", str(output)]) == 2
    _one_line_error(capsys, *words)
    assert not output.exists()


def test_info_opens_timm_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert SOURCE.name == "timm"
    assert SOURCE.recognizes("resnet18") == SURE and SOURCE.recognizes("timm/resnet18.a1_in1k") == SURE
    assert SOURCE.recognizes("gpt2") == NO and SOURCE.recognizes("./some/dir") == NO
    assert main(["info", "--model", "resnet18", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["model"]
    assert summary["adapter"] == "tdsteer_timm" and summary["model_class"] == "ResNet"
    assert summary["architecture"] == "resnet" and summary["source"] == "registry" and not summary["guessed"]
    assert summary["hidden_size"] == 512 and summary["weights_read"] is False
    assert summary["parameters"] == sum(p.numel() for p in timm.create_model("resnet18").parameters())
    assert summary["kinds"]["block"] == {"count": 8, "first": "layer1.0", "last": "layer4.1"}
    assert summary["kinds"]["stage"] == {"count": 5, "first": "act1", "last": "layer4"}  # timm numbers the stem 0


def test_extract_images_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "extract-images" in capsys.readouterr().out


def test_extract_images_records_the_architecture(folders: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "vec.safetensors"
    assert _extract(folders, output, model=f"timm/{TINY}.c3_in1k") == 0
    vector = tdsteer.SteeringVector.load(output)
    assert vector.metadata["model_name"] == TINY and vector.metadata["model_type"] == "ResNet"
    assert vector.metadata["timm_model"] == f"timm/{TINY}.c3_in1k" and vector.metadata["timm_family"] == "resnet"
    assert vector.metadata["hidden_sizes"] == {"layer4.0": 512} and vector.metadata["features_only"] is False
    model = timm.create_model(TINY, pretrained=False)
    assert tdsteer_timm.check_vector(output, model, check="error").keys() == ["layer4.0"]
    other = timm.create_model("resnet18", pretrained=False)  # the same widths, another architecture
    with pytest.raises(ValueError, match="made for timm architecture 'resnet10t' but the model is 'resnet18'"):
        tdsteer_timm.check_vector(output, other, check="error")


def test_extract_images_from_a_features_only_backbone(folders: tuple[Path, Path], tmp_path: Path) -> None:
    backbone = timm.create_model(TINY, pretrained=False, features_only=True)
    checkpoint = tmp_path / "backbone.safetensors"
    save_file(backbone.state_dict(), str(checkpoint))
    output = tmp_path / "vec.safetensors"
    code = _extract(folders, output, "--features-only", "--kind", "stage", "--checkpoint", str(checkpoint))
    assert code == 0
    vector = tdsteer.SteeringVector.load(output)
    assert vector.keys() == ["layer4"] and vector.metadata["features_only"] is True
    assert vector.metadata["layers"] == [4]  # timm's numbering: stage 0 is the stem


def test_read_cls_needs_a_class_token() -> None:
    vit = [tdsteer.Site("blocks.0", layout="NLC", prefix_tokens=1)]
    check_read("cls", vit, class_token=True)
    for sites, class_token, words in [
        ([tdsteer.Site("blocks.0", layout="NLC")], True, "has no class token (prefix_tokens=0)"),
        ([tdsteer.Site("blocks.0", layout="NLC", prefix_tokens=4)], False, "starts with 4 register tokens"),
        ([tdsteer.Site("layer4", layout="NCHW")], True, "is a feature map"),
    ]:
        with pytest.raises(CLIError, match=re.escape(words)) as refused:
            check_read("cls", sites, class_token=class_token)
        assert "use --read" in str(refused.value)
    assert default_read(vit, class_token=False) == "patch_mean"


def test_a_checkpoint_for_another_image_size_is_resampled_as_timm_does(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    checkpoint = tmp_path / "ck224.safetensors"
    save_file(timm.create_model(name, pretrained=False).state_dict(), str(checkpoint))  # pos_embed [1, 197, 192]
    output = tmp_path / "vec.safetensors"
    code = _extract(folders, output, "--checkpoint", str(checkpoint), model=name)  # --image-size 32: a 2x2 grid
    assert code == 0, capsys.readouterr().err
    assert tdsteer.SteeringVector.load(output).metadata["image_size"] == [32, 32]
    # the weights are the ones timm's own pretrained loading gives at that size
    model = create(name, 32)
    load_checkpoint(model, str(checkpoint), image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = timm.create_model(
            name, pretrained=True, img_size=32, pretrained_cfg_overlay={"file": str(checkpoint)}
        ).state_dict()
    assert model.pos_embed.shape == (1, 5, 192)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_that_cannot_be_resampled_names_image_size(tmp_path: Path) -> None:
    # CaiT's checkpoint filter does not resample pos_embed (nor does timm's pretrained loading)
    kwargs = {"depth": 1, "depth_token_only": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    checkpoint = tmp_path / "cait32.pth"
    torch.save(timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, **kwargs).state_dict(), checkpoint)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=64, **kwargs)
    with pytest.raises(CLIError) as refused:
        load_checkpoint(model, str(checkpoint), image_size=64)
    message = str(refused.value)
    assert "size mismatch for pos_embed" in message and message.endswith("try without --image-size")
    assert "\n" not in message and ".;" not in message
    with pytest.raises(CLIError) as refused:
        load_checkpoint(model, str(checkpoint))  # no --image-size given: nothing to suggest
    assert "--image-size" not in str(refused.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_steering_vector_is_not_a_checkpoint(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    vector = tdsteer.SteeringVector({tdsteer.Site("layer4", layout="NCHW"): torch.ones(512)})
    path = tmp_path / f"vector{suffix}"
    if suffix == ".safetensors":
        vector.save(path)
    else:
        vector.to_lm_eval(path, prefix="")
    assert _extract(folders, tmp_path / "out.safetensors", "--checkpoint", str(path)) == 2
    kind = "a tdsteer steering vector" if suffix == ".safetensors" else "an lm-eval steering vector"
    _one_line_error(capsys, f"--checkpoint {path} is {kind}", "not model weights")


def test_a_features_only_vector_records_the_wrapped_class(folders: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "vec.safetensors"
    assert _extract(folders, output, "--features-only", "--kind", "stage", model="convnext_atto") == 0
    vector = tdsteer.SteeringVector.load(output)
    assert vector.keys() == ["stages_3"]  # the FeatureListNet's path of stages.3
    assert vector.metadata["timm_class"] == "ConvNeXt" and vector.metadata["model_name"] == "convnext_atto"
    assert vector.metadata["model_type"] == "FeatureListNet"  # the class its site paths belong to
    classifier = timm.create_model("convnext_atto", pretrained=False).eval()
    with pytest.raises(ValueError, match="made for model type 'FeatureListNet' but the model is 'ConvNeXt'"):
        tdsteer.steer(classifier, vector)
    # docs/timm-models.md: rename the sites to use it on the classifier
    renamed = {
        dataclasses.replace(s, path=s.path.replace("stages_", "stages.", 1)): vector[k] for k, s in vector.sites.items()
    }
    on_classifier = tdsteer.SteeringVector(renamed)
    (site,) = on_classifier.sites.values()
    assert site == tdsteer_timm.sites(classifier, -1, kind="stage")[0]
    x = torch.randn(2, 3, 32, 32)
    seen: list[torch.Tensor] = []
    hook = site.module(classifier).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    with torch.no_grad():
        classifier(x)
        with tdsteer.steer(classifier, on_classifier, scale=2.0):
            classifier(x)
    hook.remove()
    torch.testing.assert_close(seen[1] - seen[0], 2.0 * vector["stages_3"].view(1, -1, 1, 1).expand_as(seen[0]))
    assert tdsteer.SteeringVector.load(_extract_features_only_getter(folders, tmp_path)).metadata["timm_class"] == (
        "VisionTransformer"
    )


def _extract_features_only_getter(folders: tuple[Path, Path], tmp_path: Path) -> Path:
    output = tmp_path / "getter.safetensors"
    assert _extract(folders, output, "--features-only", "--layers", "0", model="vit_tiny_patch16_224") == 0
    return output
