"""The family registry: a new family is one module-sized spec, and nothing in the engine names a family."""
import ast
import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from mmfuse.cli import main
from mmfuse.engine.packing import pack, packed_size
from mmfuse.kernels.objectives import Objective
from mmfuse.models import Decoder, DecoderConfig, from_pretrained
from mmfuse.models.family import (FamilySpec, PipelineHooks, families, family_for_model_type, get_family,
                                  register_family, unregister_family)
from mmfuse.models.hf_io import CheckpointError, load_native, save_checkpoint
from mmfuse.models.modality import IMAGE
from mmfuse.models.vae import LatentImages
from tests import offline

ENGINE = Path(__file__).resolve().parents[2] / "engine"


# ---------------------------------------------------------------------------------------------- a new family,
# everything it takes, in this one place: a decoder whose pooled prompt state regresses the image latents.


@dataclass
class ToyConfig:
    latent_channels: int = 4
    latent_size: int = 4
    boi_token_id: int = 0
    eoi_token_id: int = 1
    boi_token: str = "<img>"
    eoi_token: str = "</img>"


class Toy(nn.Module):
    def __init__(self, decoder: Decoder, config: ToyConfig):
        super().__init__()
        self.decoder, self.config = decoder, config
        c = config
        self.head = nn.Linear(decoder.config.dim, c.latent_channels * c.latent_size**2)

    def draw(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        return self.head(hidden).view(-1, c.latent_channels, c.latent_size, c.latent_size)


def toy_loss(model: Toy, batch, generator=None) -> Objective:
    hidden = model.decoder(batch.input_ids, position_ids=batch.position_ids, kv_start=batch.kv_start,
                           kv_end=batch.kv_end)
    lm = model.decoder.next_token_loss(hidden, batch.labels)
    at_image = hidden[batch.modality == IMAGE]  # the state at each image's single position
    mse = ((model.draw(at_image) - batch.images) ** 2).mean()
    return Objective(lm + mse, {"lm": lm, "mse": mse})


@contextlib.contextmanager
def toy_condition(model: Toy, prompts, negatives, recompute=False):
    rows = list(prompts) + list(negatives)
    drawn = torch.cat([model.draw(model.decoder(r[None])[:, -1]) for r in rows])
    yield lambda x, t: drawn  # a "denoiser" that predicts the same clean image at every step


def toy_load(path, dtype=None, device=None) -> Toy:
    def builder(cfg):
        return lambda: Toy(Decoder(DecoderConfig(**cfg["decoder"])), ToyConfig(**cfg["toy"]))

    return load_native(path, "toy_family", builder, dtype, device)


def toy_save(model: Toy, path, state_dict=None) -> None:
    cfg = {"model_type": "toy_family", "decoder": dataclasses.asdict(model.decoder.config),
           "toy": dataclasses.asdict(model.config)}
    save_checkpoint(path, cfg, model.state_dict() if state_dict is None else state_dict)


def toy_scheduler(model):
    from diffusers import DDIMScheduler

    return DDIMScheduler(prediction_type="sample", clip_sample=False)


TOY = FamilySpec(
    name="toy", model_type="toy_family", config_class=ToyConfig, description="a test family",
    special_tokens={"boi_token_id": "boi_token", "eoi_token_id": "eoi_token"},
    build=lambda parts, config: Toy(parts.decoder, config), load=toy_load, save=toy_save,
    set_trainable=lambda model: model.requires_grad_(True), llm=lambda model: model.decoder,
    blocks=lambda model: list(model.decoder.layers),
    image_input=lambda model, codec, processor: LatentImages(codec, (4, model.config.latent_size, model.config.latent_size)),
    document_size=lambda model, row_len: functools.partial(packed_size, tokens_per_image=1),
    make_batch=lambda model, docs, row_len, rows, gen: pack(docs, row_len, 1, model.config.boi_token_id,
                                                            model.config.eoi_token_id, max_rows=rows),
    loss=toy_loss, count=lambda b: {"tokens": b.num_text_tokens, "images": int(b.images.shape[0])},
    pipeline=PipelineHooks(
        latent_shape=lambda model: (4, model.config.latent_size, model.config.latent_size),
        scheduler=toy_scheduler, image_prompt=lambda model, ids: [*ids, model.config.boi_token_id],
        condition=toy_condition, text_decoder=lambda model: model.decoder, image_positions=lambda model: 1),
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    unregister_family(TOY.name)


def test_a_family_defined_in_one_place_trains_loads_and_draws(tmp_path, toy_family):
    offline.llama_base(tmp_path / "llm")
    offline.kl_vae(tmp_path / "vae")
    offline.captioned_pictures(tmp_path)
    config = offline.write_config(tmp_path, family="toy", base="llm", vae="vae", toy={"latent_size": 4},
                                  data={"path": "captions.jsonl", "row_len": 16, "rows_per_batch": 2,
                                        "num_workers": 0})
    assert main(["train", "--config", str(config)]) == 0
    model = from_pretrained(tmp_path / "run" / "model")
    assert isinstance(model, Toy) and family_for_model_type("toy_family") is toy_family
    assert model.config.boi_token_id != 0  # the tokenizer gave "<img>" its id
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--prompt", "a red square",
                 "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    assert Image.open(tmp_path / "x.png").size == (8, 8)


def test_the_builtin_families_and_lookups():
    assert {"fusion", "metamorph", "metaquery"} <= set(families())
    assert get_family("fusion").model_type == "mmfuse_fusion"
    with pytest.raises(ValueError, match="family 'dalle' is not one mmfuse knows"):
        get_family("dalle")
    with pytest.raises(ValueError, match="clashes"):
        register_family(dataclasses.replace(get_family("fusion"), name="fusion2"))  # the same model_type


def test_an_unknown_checkpoint_type_lists_what_loads(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="'gpt2' is not supported .*mmfuse_fusion.*mmfuse_metaquery"):
        from_pretrained(tmp_path)


def test_the_engine_names_no_family():
    """No module of engine/ (the demo, a fusion demo, aside) imports a family's module or compares
    against a family's name: every family goes through the registry."""
    names = set(families())
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name == "demo.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any(m.split(".")[-1] in names for m in modules), f"{path.name} imports a family module"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert node.value not in names, f"{path.name}:{node.lineno} names the family {node.value!r}"
