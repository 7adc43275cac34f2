"""Images in the prompt, text out, for the families that read images (LlamaFusion / Transfusion: clean
VAE latents at t = 0; MetaMorph: SigLIP tokens through the adapter), from model folders ``mmfuse
train`` wrote and PNG files: the KV-cached answer equals a greedy loop over the training forward
(the whole sequence recomputed every token, no cache, no prompt layout); the CLI prints it; bad
input is refused by name before any model work."""
import pytest
import torch

from mmfuse.cli import main
from mmfuse.engine.packing import Image
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.engine.prompts import lay_out
from mmfuse.engine.text import prompt_ids, text_ids
from mmfuse.models.hf_io import CheckpointError
from mmfuse.models.modality import IMAGE
from mmfuse.engine.generate import generate
from tests import offline
from tests.helpers import rel_err
from tests.engine.test_user_path import fusion_run, metamorph_run, metaquery_run

RUNS = {"fusion": fusion_run, "metamorph": metamorph_run}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A trained model folder per family, and a folder of PNG pictures."""
    out = {}
    for family, make in RUNS.items():
        root = tmp_path_factory.mktemp(family)
        assert main(["train", "--config", str(make(root))]) == 0
        out[family] = root / "run" / "model"
    pictures = tmp_path_factory.mktemp("pictures")
    for name in ("red square", "blue circle", "green square"):
        offline.picture(*name.split(), size=(30, 22)).save(pictures / f"{name.replace(' ', '_')}.png")
    out["pictures"] = pictures
    return out


def recomputed_answer(pipe: MMFusePipeline, pieces: list, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by the training forward over the whole packed sequence, token by token; the
    new tokens (up to a stop token) and the logits (V,) of the first.

    ``pieces``: text strings and PIL pictures, in order (BOS first, as prompts are)."""
    model, family, tok = pipe.model, pipe.family, pipe.tokenizer
    image_input = family.image_input(model, pipe.vae, pipe.image_processor)
    doc = [torch.tensor([tok.bos_token_id])]
    for piece in pieces:
        if isinstance(piece, str):
            doc.append(torch.tensor(text_ids(tok, piece)))
        else:
            doc.append(Image(image_input.moments(image_input.preprocess(piece)[None])[0][0], diffuse=False))
    stops = [tok.eos_token_id, model.config.boi_token_id]
    new: list[int] = []
    first_logits = None
    for _ in range(max_new_tokens):
        document = doc + ([torch.tensor(new)] if new else [])
        size = family.document_size(model, 0)(document)
        batch = family.make_batch(model, [document], size, 1, None)
        if family.name == "fusion":
            clean = torch.zeros(batch.images.shape[0], dtype=torch.long)
            hidden, _ = model(batch.input_ids, batch.modality, batch.images, clean, batch.kv_start, batch.kv_end,
                              batch.position_ids)
        else:
            hidden = model(batch.input_ids, batch.modality, model.visual_tokens(batch.images), batch.kv_start,
                           batch.kv_end, batch.position_ids)
        logits = model.decoder.logits(hidden[0, -1])
        first_logits = logits if first_logits is None else first_logits
        token = int(logits.argmax())
        if token in stops:
            break
        new.append(token)
    return new, first_logits


def pictures(folders, *names):
    from PIL import Image as PILImage

    return [PILImage.open(folders["pictures"] / f"{n}.png") for n in names]


def layout_logits(pipe, layout) -> torch.Tensor:
    """(B, V) next-token logits of a laid-out prompt, by one uncached forward."""
    decoder = pipe.model.decoder
    modality = layout.modality if decoder.config.num_experts > 1 else None
    hidden = decoder(inputs_embeds=layout.inputs_embeds, position_ids=layout.position_ids, kv_start=layout.kv_start,
                     kv_end=layout.kv_end, modality=modality)
    return decoder.logits(hidden[:, -1])


@pytest.mark.parametrize("family", RUNS)
def test_cached_answer_equals_the_recomputed_training_forward(folders, family):
    pipe = MMFusePipeline.from_pretrained(folders[family])
    red, blue, green = pictures(folders, "red_square", "blue_circle", "green_square")
    # left padding, several images in one prompt, placeholders mid-text and images-first (no placeholder)
    prompts = ["what is this <image>", "a red <image> and <image> draw me", "what is this"]
    images = [[red], [blue, green], [green]]
    refs = [recomputed_answer(pipe, ["what is this", red], 6),
            recomputed_answer(pipe, ["a red", blue, "and", green, "draw me"], 6),
            recomputed_answer(pipe, [green, "what is this"], 6)]
    layout = pipe._image_prompt_layout(prompts, None, images)
    logits = layout_logits(pipe, layout)
    for row, (_, want) in zip(logits, refs):
        assert rel_err(row, want) <= 1e-5
    stops = [pipe.tokenizer.eos_token_id, pipe.model.config.boi_token_id]
    out = generate(pipe.model.decoder, None, 6, eos_token_id=stops, layout=layout)[:, layout.input_ids.shape[1]:]
    for row, (want, _) in zip(out.tolist(), refs):
        assert row[:len(want)] == want and (len(want) == 6 or row[len(want)] in stops)
    got = pipe.generate_text(prompts, images=images, max_new_tokens=6, progress=False)
    assert got == [pipe.tokenizer.decode(w, skip_special_tokens=True) for w, _ in refs]
    ids = pipe.generate_text(prompt_ids=[[5, 6]], images=[[red]], max_new_tokens=4)
    assert len(ids) == 1 and len(ids[0]) <= 4
    # the image is read: another picture changes the prediction after it
    a, b = (layout_logits(pipe, pipe._image_prompt_layout("what is this <image>", None, img)) for img in (red, blue))
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("family", RUNS)
def test_the_image_span_layout(folders, family):
    pipe = MMFusePipeline.from_pretrained(folders[family])
    red, blue = pictures(folders, "red_square", "blue_circle")
    layout = pipe._image_prompt_layout(["<image>", "what is this <image>"], None, [[red], [blue]])
    n = pipe.family.pipeline.image_positions(pipe.model) - 1  # image positions per picture
    assert (layout.modality == IMAGE).sum(dim=1).tolist() == [n, n]
    pad = int(layout.first[0])
    assert pad > 0 and (layout.kv_end[0, :pad] <= layout.kv_start[0, :pad]).all()  # padding attends nothing
    span = (layout.modality[0] == IMAGE).nonzero().flatten()
    first_image_pos = int(span[0])
    if family == "fusion":  # bidirectional: every image position sees the whole span
        assert (layout.kv_end[0, span] == int(span[-1]) + 1).all()
    else:  # MetaMorph reads causally
        assert layout.kv_end[0, first_image_pos] == first_image_pos + 1
    assert (layout.kv_start[0, pad:] == pad).all()


@pytest.mark.parametrize("family", RUNS)
def test_the_cli_prints_the_answer_for_a_png(folders, family, capsys):
    png = folders["pictures"] / "red_square.png"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(folders[family]), "--image", str(png), "--prompt",
                 "what is this", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    pipe = MMFusePipeline.from_pretrained(folders[family])
    assert printed == pipe.generate_text("what is this", images=str(png), max_new_tokens=5)[0]


def test_bad_image_prompts_are_refused_by_name(folders, tmp_path):
    pipe = MMFusePipeline.from_pretrained(folders["fusion"])
    red, blue = pictures(folders, "red_square", "blue_circle")
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> placeholder"):
        pipe.generate_text("<image> and <image>", images=[red])
    with pytest.raises(ValueError, match="one entry .* per prompt"):
        pipe.generate_text(["a", "b"], images=[red])
    with pytest.raises(ValueError, match="no image file at"):
        pipe.generate_text("what is this", images=str(tmp_path / "missing.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image"):
        pipe.generate_text("what is this", images=str(tmp_path / "broken.png"))
    with pytest.raises(TypeError, match=r"images\[0\]\[0\]: give a PIL image"):
        pipe.generate_text("what is this", images=torch.zeros(3, 8, 8))
    no_vae = MMFusePipeline(pipe.model, pipe.tokenizer)
    with pytest.raises(CheckpointError, match="nothing to encode pictures with"):
        no_vae.generate_text("what is this", images=[red])
    morph = MMFusePipeline.from_pretrained(folders["metamorph"])
    with pytest.raises(CheckpointError, match="image_processor"):
        MMFusePipeline(morph.model, morph.tokenizer).generate_text("what is this", images=[red])


def test_a_family_that_cannot_read_images_says_so(tmp_path, capsys):
    assert main(["train", "--config", str(metaquery_run(tmp_path))]) == 0
    png = tmp_path / "img" / "0.png"
    with pytest.raises(SystemExit, match="cannot read images"):
        main(["generate", "--checkpoint", str(tmp_path / "run" / "model"), "--image", str(png), "--prompt", "what"])


# ---------------------------------------------------------------------------------------------- editing


@pytest.mark.parametrize("family", RUNS)
@pytest.mark.parametrize("scales", [(1.0, None), (3.0, None), (3.0, 1.0), (3.0, 1.5)])
def test_editing_cached_prefix_equals_the_recomputed_one(folders, family, scales):
    """Source pictures in the cached prefix (fusion: clean latents; MetaMorph: SigLIP tokens), the target
    denoised after it; every guidance branch in one batch; fp32, same seed: cached = recomputed."""
    pipe = MMFusePipeline.from_pretrained(folders[family])
    # two training steps leave the zero-initialised noise output near zero, and the random UNet's
    # cross-attention weak: larger weights, so that what the prompt holds shows in the result
    torch.manual_seed(0)
    torch.nn.init.normal_(pipe.model.patch_out.weight if family == "fusion" else pipe.model.sd_proj.weight, std=0.5)
    red, blue = pictures(folders, "red_square", "blue_circle")
    guidance, image_guidance = scales
    kwargs = dict(images=[[red], [blue, red]], num_inference_steps=2, guidance_scale=guidance,
                  image_guidance_scale=image_guidance, seed=3, output_type="pt", num_images_per_prompt=2)
    prompts = ["<image> make it blue", "a red <image> and <image>"]
    cached, recomputed = pipe(prompts, **kwargs), pipe(prompts, **kwargs, recompute=True)
    assert cached.latents.shape[0] == 4 and torch.isfinite(cached.latents).all()
    assert rel_err(cached.latents, recomputed.latents) <= 1e-5
    # the source picture conditions the result: another picture, another edit
    other = pipe(prompts, **{**kwargs, "images": [[blue], [blue, red]]})
    assert rel_err(other.latents[:2], cached.latents[:2]) > 1e-4
    assert torch.allclose(other.latents[2:], cached.latents[2:], atol=1e-6)


def test_guidance_branches_and_their_rows(folders):
    from mmfuse.engine.pipeline import guidance_branches, guide

    assert guidance_branches(False, 1.0, 1.0) == ["full"] and guidance_branches(False, 2.0, 7.0) == ["full", "uncond"]
    assert guidance_branches(True, 2.0, 2.0) == ["full", "uncond"]
    assert guidance_branches(True, 2.0, 1.0) == ["full", "image"]
    assert guidance_branches(True, 7.5, 1.5) == ["full", "image", "uncond"]
    f, i, u = torch.tensor(3.0), torch.tensor(2.0), torch.tensor(1.0)
    assert guide({"full": f, "image": i, "uncond": u}, 7.5, 1.5) == 1.0 + 1.5 * 1.0 + 7.5 * 1.0  # InstructPix2Pix
    assert guide({"full": f, "uncond": u}, 2.0, 2.0) == 1.0 + 2.0 * 2.0
    # what each branch's row holds: the prompt and its picture / the picture alone / nothing, then BOI
    pipe = MMFusePipeline.from_pretrained(folders["fusion"])
    red, = pictures(folders, "red_square")
    layout = pipe._image_branch_layout("make it blue", None, "", [red], ["full", "image", "uncond"], 1)
    n = pipe.model.config.patches_per_image
    real = layout.attention_mask.sum(dim=1).tolist()
    bos, boi = pipe.tokenizer.bos_token_id, pipe.model.config.boi_token_id
    text = len(text_ids(pipe.tokenizer, "make it blue"))
    assert real == [1 + (n + 2) + text + 1, 1 + (n + 2) + 1, 1]
    assert (layout.input_ids[:, -1] == boi).all() and int(layout.input_ids[1, -(n + 4)]) == bos
    assert (layout.modality == IMAGE).sum(dim=1).tolist() == [n, n, 0]


def test_editing_from_the_cli_writes_a_png(folders, tmp_path):
    from PIL import Image as PILImage

    png, out = folders["pictures"] / "red_square.png", tmp_path / "edited.png"
    assert main(["generate", "--checkpoint", str(folders["fusion"]), "--image", str(png), "--prompt", "make it blue",
                 "--out", str(out), "--steps", "2", "--guidance", "2", "--image-guidance", "1.5"]) == 0
    assert PILImage.open(out).size == (8, 8)
    with pytest.raises(SystemExit, match="--image-guidance must be >= 1"):
        main(["generate", "--checkpoint", str(folders["fusion"]), "--image", str(png), "--prompt", "x",
              "--out", str(out), "--image-guidance", "0.5"])


# ---------------------------------------------------------------------------------------------- interleaved


def image_after(k: int, boi: int, eos: int):
    """A logits processor: greedy text that asks for an image after exactly ``k`` tokens, and never stops."""
    def process(tokens, logits):
        logits = logits.clone()
        if len(tokens) == k:
            logits[:] = float("-inf")
            logits[boi] = 0.0
        else:
            logits[[boi, eos]] = float("-inf")
        return logits

    return process


@pytest.mark.parametrize("family", RUNS)
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_interleaved_image_equals_the_plain_pipeline_on_the_same_prefix_and_noise(folders, family, guidance):
    pipe = MMFusePipeline.from_pretrained(folders[family])
    torch.manual_seed(0)
    torch.nn.init.normal_(pipe.model.patch_out.weight if family == "fusion" else pipe.model.sd_proj.weight, std=0.5)
    # trailing spacing ends the loop at t = 499: the last step's noised K/V are far from the clean ones
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    tok, config = pipe.tokenizer, pipe.model.config
    force, seen = image_after(2, config.boi_token_id, tok.eos_token_id), {}

    def process(tokens, logits):
        seen.setdefault(len(tokens), logits.clone())
        return force(tokens, logits)

    out = pipe.generate_interleaved("a red", max_new_tokens=7, max_images=1, guidance_scale=guidance,
                                    num_inference_steps=2, seed=0, output_type="latent", logits_processor=process)
    ids = out.text_ids
    assert ids[2] == config.boi_token_id and ids[3] == config.eoi_token_id and len(ids) == 8
    assert [type(s).__name__ for s in out.segments] == ["str", "Tensor", "str"] and len(out.latents) == 1
    # the image: the plain image pipeline on the prompt + the text before BOI, from the same noise
    prefix = prompt_ids(tok, "a red") + ids[:2]
    plain = pipe(prompt_ids=[prefix], latents=out.noise[0], guidance_scale=guidance, num_inference_steps=2,
                 output_type="latent")
    assert rel_err(out.latents[0], plain.latents) <= 1e-5
    if family == "fusion":  # the text after it reads the finished image's clean K/V (t = 0)
        document = [torch.tensor(prefix), Image(out.latents[0][0], diffuse=False)]
        layout = lay_out(pipe.family, pipe.model, [document], pipe.device)
        assert rel_err(seen[4], layout_logits(pipe, layout)[0]) <= 1e-5  # the logits right after EOI
        want = generate(pipe.model.decoder, None, 4, layout=layout)[0, layout.input_ids.shape[1]:].tolist()
        banned = next((i for i, t in enumerate(want) if t in (config.boi_token_id, tok.eos_token_id)), len(want))
        assert banned > 0 and ids[4:4 + banned] == want[:banned]


def test_interleaved_generation_bad_input(folders):
    pipe = MMFusePipeline.from_pretrained(folders["fusion"])
    with pytest.raises(ValueError, match="give one prompt"):
        pipe.generate_interleaved(["a", "b"])
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        pipe.generate_interleaved("a", max_new_tokens=0)
    with pytest.raises(ValueError, match="exceed the model's context"):
        pipe.generate_interleaved("a", max_new_tokens=10, max_images=10**6)
    # no image wanted: plain text, stopped at EOS or after max_images
    out = pipe.generate_interleaved("a red", max_new_tokens=3, max_images=0, output_type="latent")
    assert out.latents == [] and len(out.text_ids) <= 3


@pytest.mark.parametrize("family", RUNS)
def test_pictures_of_any_mode_and_size_are_read(folders, family):
    """Palette, alpha, grayscale, bilevel, CMYK and 32-bit pictures, of any size, are converted and resized
    to what the model reads (as the family's processor does) rather than refused or misread."""
    from PIL import Image as PILImage

    pipe = MMFusePipeline.from_pretrained(folders[family])
    red, = pictures(folders, "red_square")
    rgb = red.convert("RGB")
    for mode in ("RGBA", "P", "LA", "L", "1", "CMYK", "I"):
        picture = rgb.convert(mode)
        assert isinstance(pipe.generate_text("what is this <image>", images=picture, max_new_tokens=1)[0], str), mode
    tiny_and_wide = PILImage.new("RGB", (3, 1), (200, 10, 10))
    layout = pipe._image_prompt_layout("what is this <image>", None, tiny_and_wide)
    assert torch.isfinite(layout.inputs_embeds).all()
