"""MetaQuery on a tiny random Qwen2 checkpoint with tiny SANA / SD1.5 diffusion decoders (all built offline)."""
import copy
import math

import pytest
import torch
from diffusers import DDPMScheduler, SanaTransformer2DModel, UNet2DConditionModel

from mmfuse.kernels import default_backend
from mmfuse.models import from_pretrained
from mmfuse.engine.pipeline import MMFusePipeline
from mmfuse.models.metaquery import (Connector, MetaQuery, MetaQueryConfig, PromptImageBatch, connector_layer_config,
                                     load_metaquery, save_metaquery)
from tests.helpers import rel_err, triton_devices
from tests.models.test_decoder import tiny_qwen2

COND = 24  # the diffusion decoders' conditioning width
# head dim 32 everywhere attention may run on Triton (the LLM and the connector)
QWEN = dict(hidden_size=64, intermediate_size=80, num_attention_heads=2, num_key_value_heads=1)
SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=COND,
            sample_size=8, patch_size=1)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=COND, attention_head_dim=4, norm_num_groups=4)
SD15_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
KINDS = ("sana", "sd15")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers model, our decoder loaded from its checkpoint)."""
    torch.manual_seed(0)
    hf = tiny_qwen2(**QWEN)
    path = tmp_path_factory.mktemp("qwen")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


@pytest.fixture(scope="module")
def qwen_one_layer(tmp_path_factory):
    """A one-layer decoder: the interpreted Triton test pays per kernel launch."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen1")
    tiny_qwen2(**QWEN, num_hidden_layers=1).save_pretrained(path)
    return from_pretrained(path)


def make_model(kind: str, llm, **overrides) -> MetaQuery:
    config = MetaQueryConfig(**{**dict(num_queries=5, connector_layers=2, connector_dim=64, connector_heads=2,
                                       connector_hidden_dim=96, cond_dim=COND, decoder=kind), **overrides})
    diffusion = SanaTransformer2DModel(**SANA) if kind == "sana" else UNet2DConditionModel(**UNET)
    return MetaQuery(copy.deepcopy(llm), diffusion, config)


def padded_prompts(gen: torch.Generator):
    """Rows: right-padded, left-padded, unpadded, all padding (the unconditional prompt)."""
    ids = torch.randint(0, 97, (4, 7), generator=gen)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :3] = False
    mask[3] = False
    return ids, mask


def batch(gen: torch.Generator) -> PromptImageBatch:
    ids, mask = padded_prompts(gen)
    return PromptImageBatch(ids[:3], mask[:3], torch.randn(3, 4, 8, 8, generator=gen))


def test_query_states_match_transformers_with_padding(qwen):
    hf, llm = qwen
    model = make_model("sana", llm)
    ids, mask = padded_prompts(torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.query_states(ids, mask)
        for b in range(ids.shape[0]):  # each prompt alone, unpadded, through transformers
            embeds = torch.cat([hf.model.embed_tokens(ids[b][mask[b]]), model.queries])[None]
            want = hf.model(inputs_embeds=embeds).last_hidden_state[0, -5:]
            assert rel_err(got[b], want) <= 1e-4, b
    assert got.shape == (4, 5, 64)


def test_query_gradients_match_transformers_with_padding(qwen):
    """The prompt runs without autograd into a KV cache and only the queries carry a graph: their
    gradient still equals transformers' full pass over prompt + queries."""
    hf, llm = qwen
    model = make_model("sana", llm)
    ids, mask = padded_prompts(torch.Generator().manual_seed(0))
    weights = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1))
    (model.query_states(ids, mask) * weights).sum().backward()
    queries = model.queries.detach().clone().requires_grad_()
    total = 0
    for b in range(ids.shape[0]):
        embeds = torch.cat([hf.model.embed_tokens(ids[b][mask[b]]).detach(), queries])[None]
        total = total + (hf.model(inputs_embeds=embeds).last_hidden_state[0, -5:] * weights[b]).sum()
    total.backward()
    assert rel_err(model.queries.grad, queries.grad) <= 1e-4


def test_llm_pass_is_causal(qwen):
    model = make_model("sana", qwen[1])
    data = batch(torch.Generator().manual_seed(0))
    ids, mask = data.prompt_ids, data.prompt_mask
    outputs = []
    model.llm.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model.query_states(ids, mask)
        model.queries[-1].normal_()
        model.query_states(ids, mask)
    # Each call fills the KV cache with the prompt (Decoder.fill_cache: not a forward, and before any
    # query exists, so no query can reach it), then runs the queries: one forward per call.
    before, after = outputs
    assert torch.equal(before[:, :-1], after[:, :-1])  # the earlier queries see no change
    assert not torch.allclose(before[:, -1], after[:, -1])


def reference_connector(connector: Connector, x: torch.Tensor) -> torch.Tensor:
    """A plain float64 bidirectional pre-norm transformer encoder with RoPE positions 0..N-1, no mask."""
    c = connector.layer_config
    x, N, hd = x.double(), x.shape[1], c.head_dim

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w.double()

    def rope(t):  # (B, H, N, hd), rotate-half convention
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(N, dtype=torch.float64)[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    for layer in connector.layers:
        h = rms(x, layer.attn_norm.weights[0])
        q, k, v = (h @ layer.attn.qkv.weights[0].double().T).split(c.num_heads * hd, -1)
        q, k, v = (t.unflatten(-1, (c.num_heads, hd)).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd), -1) @ v
        x = x + att.transpose(1, 2).flatten(2) @ layer.attn.o.weights[0].double().T
        gate, up = (rms(x, layer.mlp_norm.weights[0]) @ layer.mlp.gate_up.weights[0].double().T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.mlp.down.weights[0].double().T
    x = rms(x, connector.norm.weights[0])
    lin1, lin2 = connector.proj_out[0], connector.proj_out[2]
    x = torch.nn.functional.gelu(x @ lin1.weight.double().T + lin1.bias.double())
    return rms(x @ lin2.weight.double().T + lin2.bias.double(), connector.out_norm.weights[0])


def test_connector_is_bidirectional_and_matches_a_plain_encoder(qwen):
    connector = make_model("sana", qwen[1]).connector
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = connector(x)
        assert out.shape == (2, 5, COND)
        assert rel_err(out, reference_connector(connector, x)) <= 1e-4
        x2 = x.clone()
        x2[:, -1] += 1.0
        assert not torch.allclose(connector(x2)[:, 0], out[:, 0])  # the first query sees the last one


def test_connector_widths(qwen):
    llm = qwen[1].config
    narrow = connector_layer_config(llm, MetaQueryConfig(connector_layers=1, connector_dim=32, connector_heads=1,
                                                         connector_hidden_dim=48))
    connector = Connector(64, narrow, COND)  # projects the LLM's 64 down to 32 first
    assert connector(torch.randn(2, 3, 64)).shape == (2, 3, COND)
    same = connector_layer_config(llm, MetaQueryConfig(connector_layers=1))  # default: the LLM's layer shapes
    assert (same.dim, same.hidden_dim, same.num_heads, same.head_dim, same.qkv_bias) == (64, 80, 2, 32, True)
    assert isinstance(Connector(64, same, COND).proj_in, torch.nn.Identity)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_llm_gets_no_gradient_and_the_rest_trains(qwen, kind):
    model = make_model(kind, qwen[1])
    objective = model.training_loss(batch(torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert torch.isfinite(objective.total) and set(objective.components) == {"diffusion"}
    objective.total.backward()
    for name, p in model.llm.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = [model.queries, *model.connector.parameters(), *model.diffusion.parameters()]
    assert all(p.requires_grad for p in trainable)
    assert model.queries.grad.abs().sum() > 0
    assert model.connector.layers[0].attn.qkv.weights[0].grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.diffusion.parameters() if p.grad is not None) > 0
    assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_the_flow_matching_or_ddpm_objective(qwen, kind):
    """Recover eps from the decoder's actual input (x_t, timestep) and check the loss against the formula."""
    model = make_model(kind, qwen[1])
    data = batch(torch.Generator().manual_seed(0))
    latents = data.images
    seen = {}

    def capture(module, args, kwargs, out):
        seen.update(x_t=args[0], t=kwargs["timestep"], pred=out[0])

    model.diffusion.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        loss = model.training_loss(data, torch.Generator().manual_seed(1)).total
    x0, x_t, t = latents.double(), seen["x_t"].double(), seen["t"].double()
    if kind == "sana":  # x_t = (1 - s) x0 + s eps, timestep = 1000 s, target eps - x0
        s = (t / 1000)[:, None, None, None]
        target = (x_t - (1 - s) * x0) / s - x0
    else:  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target eps, abar from diffusers' own scheduler
        abar = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.double()[t.long()][:, None, None, None]
        target = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert rel_err(loss, ((seen["pred"].double() - target) ** 2).mean()) <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch_backend(qwen_one_layer, kind):
    model = make_model(kind, qwen_one_layer, connector_layers=1)
    data = batch(torch.Generator().manual_seed(0))
    losses, grads = [], []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with default_backend(backend):
            objective = model.training_loss(data, torch.Generator().manual_seed(1))
            objective.total.backward()
        losses.append(objective.total.detach())
        grads.append((model.queries.grad.clone(), model.connector.layers[0].mlp.down.weights[0].grad.clone()))
    assert torch.isfinite(losses[1]) and rel_err(losses[1], losses[0]) <= 1e-4
    for got, want in zip(grads[1], grads[0]):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("kind,guidance", [("sana", 1.0), ("sana", 4.0), ("sd15", 1.0), ("sd15", 7.5)])
def test_the_pipeline_runs_the_llm_and_connector_once(qwen, kind, guidance):
    model = make_model(kind, qwen[1]).eval()
    calls = {"llm": 0, "connector": 0, "diffusion": 0}
    # the LLM counted by its first layer: the prompt's cache fill is not a forward of the LLM itself
    watched = {"llm": model.llm.layers[0], "connector": model.connector, "diffusion": model.diffusion}
    for name, module in watched.items():
        module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    pipe = MMFusePipeline(model)
    prompts = [[5, 6, 7], [8, 9], [10]]
    latents = pipe(prompt_ids=prompts, num_inference_steps=3, guidance_scale=guidance, seed=2, output_type="latent").images
    # one conditioning (the LLM: the prompt's cache fill, then the queries), not one per step; guidance:
    # both halves in the same calls
    assert calls == {"llm": 2, "connector": 1, "diffusion": 3}
    assert latents.shape == (3, 4, 8, 8) and torch.isfinite(latents).all()
    again = pipe(prompt_ids=prompts, num_inference_steps=3, guidance_scale=guidance, seed=2, output_type="latent").images
    assert torch.equal(latents, again)


@pytest.mark.parametrize("kind", KINDS)
def test_native_checkpoint_round_trip(qwen, kind, tmp_path):
    model = make_model(kind, qwen[1])
    save_metaquery(model, tmp_path / "mq")
    back = load_metaquery(tmp_path / "mq")
    data = batch(torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.training_loss(data, torch.Generator().manual_seed(2)).total
        b = back.training_loss(data, torch.Generator().manual_seed(2)).total
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in back.llm.parameters()) and back.queries.requires_grad


def test_prompt_dropout_hides_prompts_only_in_training(qwen):
    model = make_model("sana", qwen[1], prompt_dropout=1.0)
    data = batch(torch.Generator().manual_seed(0))
    ids, mask = data.prompt_ids, data.prompt_mask
    conds = []
    model.connector.register_forward_hook(lambda module, args, out: conds.append(out))
    with torch.no_grad():
        model.training_loss(data)
        model.eval()
        model.training_loss(data)
        no_prompt, with_prompt = model.condition(ids, torch.zeros_like(mask)), model.condition(ids, mask)
    assert torch.equal(conds[0], no_prompt) and torch.equal(conds[1], with_prompt)
    assert not torch.allclose(no_prompt, with_prompt)


def test_bf16_llm_with_fp32_trainable_parts(qwen):
    model = make_model("sd15", qwen[1])
    model.llm.to(torch.bfloat16)
    objective = model.training_loss(batch(torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    objective.total.backward()
    assert objective.total.dtype == torch.float32 and torch.isfinite(objective.total)
    assert model.queries.grad.dtype == torch.float32 and model.queries.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_runs_and_stays_close_to_fp32(qwen, kind):
    model = make_model(kind, qwen[1])
    loss = lambda: model.training_loss(batch(torch.Generator().manual_seed(0)),  # noqa: E731
                                       torch.Generator().manual_seed(1)).total
    fp32 = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss()
    bf16.backward()
    assert model.connector.layers[0].attn.qkv.weights[0].grad.dtype == torch.float32
    # within about one bf16 ulp (2^-7) of the fp32 loss: the casts are in the right places
    assert abs(float(bf16.detach()) - float(fp32.detach())) <= 1e-2 * abs(float(fp32.detach()))


def test_rejects_bad_inputs(qwen):
    model = make_model("sana", qwen[1])
    data = batch(torch.Generator().manual_seed(0))
    ids, latents, mask = data.prompt_ids, data.images, data.prompt_mask
    with pytest.raises(ValueError, match="prompt_mask"):
        model.condition(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="prompt_mask"):
        model.condition(ids, mask.int())
    with pytest.raises(ValueError, match="prompt_ids"):
        model.condition(ids.float())
    with pytest.raises(ValueError, match="latents"):
        model.training_loss(PromptImageBatch(ids, mask, latents[:, :3]))
    with pytest.raises(ValueError, match="latents"):
        model.training_loss(PromptImageBatch(ids, mask, latents[:2]))
    with pytest.raises(ValueError, match="cond_dim"):
        MetaQuery(qwen[1], SanaTransformer2DModel(**{**SANA, "caption_channels": 32}), MetaQueryConfig(cond_dim=COND))
    with pytest.raises(ValueError, match="config.decoder"):
        MetaQuery(qwen[1], SanaTransformer2DModel(**SANA), MetaQueryConfig(cond_dim=COND, decoder="flux"))
    with pytest.raises(ValueError, match="connector_dim"):
        MetaQuery(qwen[1], SanaTransformer2DModel(**SANA), MetaQueryConfig(cond_dim=COND, connector_dim=64))
