"""MetaMorph on a tiny Llama + tiny SigLIP tower, with a tiny SD1.5-style UNet for decoding."""
import pytest
import torch

from mmfuse.engine.packing import Image, pack
from mmfuse.kernels import default_backend, mask_intervals
from mmfuse.models import from_pretrained, load_siglip
from mmfuse.models.metamorph import MetaMorph, MetaMorphConfig, make_batch
from tests.helpers import rel_err, triton_devices
from tests.models.test_decoder import tiny_llama
from tests.models.test_siglip import TINY, tiny_vision

CONFIG = MetaMorphConfig(num_visual_tokens=4, boi_token_id=3, eoi_token_id=4, sd_cross_attention_dim=32)


def build(path, **vision_overrides) -> MetaMorph:
    tiny_llama().save_pretrained(path / "llm")
    tiny_vision(**vision_overrides).save_pretrained(path / "vision")
    return MetaMorph(from_pretrained(path / "llm"), load_siglip(path / "vision"), CONFIG)


@pytest.fixture
def model(tmp_path):
    return build(tmp_path)


def batch(gen: torch.Generator):
    size = TINY["image_size"]
    images = [Image(torch.rand(3, size, size, generator=gen)) for _ in range(2)]
    docs = [[[10, 11, 12], images[0], [13, 14]], [[20], images[1], [21, 22, 23]]]
    packed = pack(docs, row_len=24, tokens_per_image=CONFIG.num_visual_tokens, boi_token_id=CONFIG.boi_token_id,
                  eoi_token_id=CONFIG.eoi_token_id)
    # MetaMorph is causal over visual tokens too: intervals without spans, documents kept.
    packed.kv_start, packed.kv_end = mask_intervals(torch.zeros_like(packed.span_ids), packed.doc_ids)
    return packed


def test_the_family_batch_is_causal_over_visual_tokens(model):
    docs = [[[10, 11, 12], Image(torch.rand(3, TINY["image_size"], TINY["image_size"])), [13, 14]]]
    packed = make_batch(model, docs, 24)
    want_start, want_end = mask_intervals(torch.zeros_like(packed.span_ids), packed.doc_ids)
    assert torch.equal(packed.kv_start, want_start) and torch.equal(packed.kv_end, want_end)


def test_loss_is_finite_and_only_trainable_parts_get_gradients(model):
    objective = model.training_loss(batch(torch.Generator().manual_seed(0)))
    assert torch.isfinite(objective.total) and set(objective.components) == {"lm", "cosine"}
    objective.total.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.adapter[0].weight.grad.abs().sum() > 0 and model.vision_head.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].attn.qkv.weights[0].grad.abs().sum() > 0


def test_cosine_term_matches_an_explicit_reference(model):
    args = batch(torch.Generator().manual_seed(0))
    modality = args.modality
    targets = model.visual_tokens(args.images)
    hidden = model(args.input_ids, modality, targets, args.kv_start, args.kv_end, args.position_ids)
    preds, wants = [], []
    flat_targets = iter(targets.reshape(-1, targets.shape[-1]))
    for b in range(modality.shape[0]):
        for i in range(1, modality.shape[1]):
            if modality[b, i] == 1:  # the hidden state one position earlier regresses this token
                preds.append(model.vision_head(hidden[b, i - 1]))
                wants.append(next(flat_targets))
    ref = (1 - torch.nn.functional.cosine_similarity(torch.stack(preds), torch.stack(wants), dim=-1)).mean()
    got = model.training_loss(args).components["cosine"]
    assert rel_err(got, ref) <= 1e-5


def test_the_vision_head_is_linear_by_default_and_an_mlp_on_request(tmp_path):
    import dataclasses

    linear = build(tmp_path)
    assert isinstance(linear.vision_head, torch.nn.Linear)
    mlp = MetaMorph(linear.decoder, linear.vision, dataclasses.replace(CONFIG, vision_head="mlp"))
    assert isinstance(mlp.vision_head, torch.nn.Sequential) and len(mlp.vision_head) == 3
    with pytest.raises(ValueError, match="vision_head"):
        MetaMorphConfig(vision_head="conv")


def test_token_by_token_the_answer_is_the_target(model):
    """An input image, a question, an answer and an answer image: exactly the answer's visual tokens
    are cosine targets, and exactly the answer text (and the answer image's BOI / EOI) are CE targets."""
    import dataclasses

    from mmfuse.engine.packing import PromptText

    size, gen = TINY["image_size"], torch.Generator().manual_seed(3)
    question, answer = [10, 11, 12], [13, 14]
    doc = [[1], Image(torch.rand(3, size, size, generator=gen), diffuse=False), PromptText(torch.tensor(question)),
           answer, Image(torch.rand(3, size, size, generator=gen), diffuse=True)]
    packed = make_batch(model, [doc], 32)
    n, boi, eoi = CONFIG.num_visual_tokens, CONFIG.boi_token_id, CONFIG.eoi_token_id
    # [BOS] BOI v v v v EOI q q q a a BOI v v v v EOI: the targets, position by position
    layout = [1, boi, *[0] * n, eoi, *question, *answer, boi, *[0] * n, eoi]
    trained = [False] * (1 + n + 2 + len(question)) + [True] * len(answer) + [True] + [False] * n + [True]
    labels = packed.labels[0, :len(layout)].tolist()
    assert labels == [t if keep else -100 for t, keep in zip(layout, trained)]
    assert (packed.labels[0, len(layout):] == -100).all()
    # cosine on the answer image's tokens only: an explicit reference over them
    targets = model.visual_tokens(packed.images)
    hidden = model(packed.input_ids, packed.modality, targets, packed.kv_start, packed.kv_end, packed.position_ids)
    answer_start = 1 + n + 2 + len(question) + len(answer) + 1  # the answer image's first visual position
    preds = model.vision_head(hidden[0, answer_start - 1:answer_start - 1 + n])
    ref = (1 - torch.nn.functional.cosine_similarity(preds, targets[1], dim=-1)).mean()
    assert rel_err(model.training_loss(packed).components["cosine"], ref) <= 1e-5
    everything = MetaMorph(model.decoder, model.vision, dataclasses.replace(CONFIG, cosine_on_inputs=True))
    everything.load_state_dict(model.state_dict())
    assert rel_err(everything.training_loss(packed).components["cosine"], ref) > 1e-3


def test_visual_tokens_are_pooled_and_normalised(model):
    tokens = model.visual_tokens(torch.rand(2, 3, TINY["image_size"], TINY["image_size"]))
    assert tokens.shape == (2, CONFIG.num_visual_tokens, TINY["hidden_size"])
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, CONFIG.num_visual_tokens))


def test_cached_generation_equals_full_recomputation(model):
    prompt = torch.tensor([[10, 11, CONFIG.boi_token_id], [12, 13, CONFIG.boi_token_id]])
    tokens = model.generate_visual_tokens(list(prompt))
    assert tokens.shape == (2, CONFIG.num_visual_tokens, TINY["hidden_size"])
    assert all(layer.attn.kv_cache is None for layer in model.decoder.layers)  # the call released its cache
    assert rel_err(model.generate_visual_tokens(list(prompt), recompute=True), tokens) <= 1e-5
    # Reference: feed prompt + the tokens so far without a cache, read the next one off the last position.
    for k in range(CONFIG.num_visual_tokens):
        L = prompt.shape[1] + k
        ids = torch.cat([prompt, torch.zeros(2, k, dtype=torch.long)], dim=1)
        modality = torch.zeros_like(ids)
        modality[:, prompt.shape[1]:] = 1
        s, e = mask_intervals(torch.zeros_like(ids))
        with torch.no_grad():
            hidden = model(ids, modality, tokens[:, :k], s, e)
            want = torch.nn.functional.normalize(model.vision_head(hidden[:, L - 1]), dim=-1)
        assert rel_err(tokens[:, k], want) <= 1e-5


def test_left_padding_does_not_change_a_prompts_tokens(model):
    short = torch.tensor([10, CONFIG.boi_token_id])
    alone = model.generate_visual_tokens([short])
    beside = model.generate_visual_tokens([short, torch.tensor([12, 13, 14, 15, CONFIG.boi_token_id])])
    assert rel_err(beside[:1], alone) <= 1e-5


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch_backend(tmp_path):
    model = build(tmp_path, hidden_size=64)  # the Triton attention needs head dim 32 (64 / 2 heads)
    args = batch(torch.Generator().manual_seed(0))
    totals = []
    for backend in ("torch", "triton"):
        with default_backend(backend):
            totals.append(model.training_loss(args).total.detach())
    assert rel_err(totals[1], totals[0]) <= 1e-4


def test_rejects_mismatched_visual_tokens(model):
    b = batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="visual positions"):
        model(b.input_ids, b.modality, torch.zeros(1, CONFIG.num_visual_tokens, TINY["hidden_size"]), b.kv_start,
              b.kv_end)
    with pytest.raises(ValueError, match="BOI"):
        model.generate_visual_tokens([torch.tensor([10, 11])])


def test_native_checkpoint_round_trip(model, tmp_path):
    from mmfuse.models import CheckpointError
    from mmfuse.models.metamorph import load_metamorph, save_metamorph

    save_metamorph(model, tmp_path / "mm")
    loaded = from_pretrained(tmp_path / "mm")
    assert isinstance(loaded, MetaMorph) and loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in loaded.vision.parameters())
    args = batch(torch.Generator().manual_seed(0))
    assert torch.equal(loaded.training_loss(args).total, model.training_loss(args).total)
    with pytest.raises(CheckpointError, match="mmfuse_metamorph"):
        load_metamorph(tmp_path / "llm")


def test_bf16_autocast_runs_and_stays_close_to_fp32(model):
    args = batch(torch.Generator().manual_seed(0))
    fp32 = model.training_loss(args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.training_loss(args)
    bf16.total.backward()  # the adapter and the vision head train through the bf16 path
    assert model.adapter[0].weight.grad is not None and model.adapter[0].weight.grad.dtype == torch.float32
    for name in fp32.components:  # within about one bf16 ulp (2^-7): the casts are in the right places
        want, got = float(fp32.components[name]), float(bf16.components[name])
        assert abs(got - want) <= 1e-2 * abs(want), name
