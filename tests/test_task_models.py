"""Task models: shapes, hook timing, fused vs stepped recurrence, KV-cached decoding, golden swaps."""

from __future__ import annotations

import pytest
import torch

from llm_mas.backends import Edit, TorchHookBackend
from llm_mas.errors import ConfigError, DataError, InterventionError
from llm_mas.models import ARCHS, build_task_model
from llm_mas.sites import Site

V, B, T = 9, 3, 11
ATOL = 1e-5
SITES = {"gru": ["embeddings", "layer0"], "lstm": ["embeddings", "layer0"],
         "transformer": ["embeddings", "layer0", "layer1"]}


def tiny(arch: str, seed: int = 0, **kw):
    """A small eval-mode model (d = 16) so tests stay fast; the code paths are those of d = 128."""
    sizes = {"d_model": 16, "ff_width": 32} if arch == "transformer" else {"d_model": 16, "head_width": 32}
    sizes.update(kw)
    return build_task_model(arch, "multiobject", V, seed=seed, **sizes).eval()


def ids_batch(seed: int = 0, batch: int = B, length: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, length), generator=g)  # (B, T)


def mask_at(positions, batch: int = B, length: int = T) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, list(positions)] = True
    return mask


backend = TorchHookBackend()


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_attributes(arch):
    model = tiny(arch)
    ids = ids_batch()
    with torch.no_grad():
        logits = model(ids)
        tokens, roll_logits = model.rollout(ids, torch.zeros_like(ids, dtype=torch.bool))
    assert logits.shape == (B, T, V) and roll_logits.shape == (B, T, V) and tokens.shape == (B, T)
    assert model.arch == arch and model.task_name == "multiobject" and model.vocab_size == V
    assert model.d_model == 16 and model.config["arch"] == arch
    aliases = model.site_aliases()
    assert aliases["embeddings"] == "hook_embed"
    assert aliases["hidden"] == f"hook_layers.{model.n_layers - 1}"
    latents = backend.collect(model, ids, ["embeddings", "hidden"])
    assert all(v.shape == (B, T, 16) for v in latents.values())


def test_default_sizes_match_the_method():
    gru = build_task_model("gru", "multiobject", V, seed=0)
    lstm = build_task_model("lstm", "multiobject", V, seed=0)
    tf = build_task_model("transformer", "multiobject", V, seed=0)
    assert gru.rnns[0].hidden_size == 128 and gru.head[0].out_features == 512
    assert lstm.rnns[0].hidden_size == 64 and lstm.d_model == 128 and lstm.head[0].in_features == 64
    assert tf.n_layers == 2 and tf.blocks[0].ff[0].out_features == 512 and tf.d_model == 128


def test_build_errors_list_valid_choices():
    with pytest.raises(ConfigError, match="gru, lstm, transformer"):
        build_task_model("rnn", "multiobject", V, seed=0)
    with pytest.raises(ConfigError, match="valid options"):
        build_task_model("gru", "multiobject", V, seed=0, n_heads=2)
    with pytest.raises(ConfigError, match="dropout"):
        build_task_model("gru", "multiobject", V, seed=0, dropout=1.5)


def test_seed_determines_weights():
    a, b, c = tiny("gru", 1), tiny("gru", 1), tiny("gru", 2)
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_rebuild_from_config():
    model = tiny("lstm", 3)
    again = build_task_model(**{k: v for k, v in model.config.items()})
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("arch", ARCHS)
def test_stepping_every_position_equals_fused(arch):
    """Identity edits at every step force the one-step path: same logits as the fused kernels."""
    model = tiny(arch)
    ids = ids_batch()
    with torch.no_grad():
        reference = model(ids)
        for site in SITES[arch]:
            edit = Edit(Site.parse(site), torch.ones(B, T, dtype=torch.bool), lambda x, w: x.clone())
            patched = backend.patch(model, ids, [edit])
            assert edit.fired == B * T
            torch.testing.assert_close(patched, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("position", [0, 4, T - 1])
def test_edit_changes_only_later_outputs(arch, position):
    model = tiny(arch)
    ids = ids_batch()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        reference = model(ids)
        for site in SITES[arch]:
            shift = torch.randn(16, generator=g) * 3
            edit = Edit(Site.parse(site), mask_at([position]), lambda x, w, shift=shift: x + shift)
            patched = backend.patch(model, ids, [edit])
            assert torch.equal(patched[:, :position], reference[:, :position]), site
            change = (patched - reference).abs().amax(dim=(0, 2))  # (T,)
            assert change[position] > 1e-3, site
            # the Transformer's last residual output feeds only its own position's logits
            last_residual = arch == "transformer" and site == "layer1"
            if position < T - 1 and not last_residual:
                assert change[position + 1:].max() > 1e-4, f"{site}: the edit did not reach later positions"
            elif last_residual:
                assert not change[position + 1:].any()


def test_lstm_latent_is_split_back_into_h_and_c():
    model = tiny("lstm")
    ids = ids_batch()
    p = 4
    with torch.no_grad():
        reference = model(ids)
        c_only = torch.cat([torch.zeros(8), torch.full((8,), 2.0)])  # latent = [h (8); c (8)]
        patched = backend.patch(model, ids, [Edit(Site.parse("layer0"), mask_at([p]), lambda x, w: x + c_only)])
        # the head reads h only: the output at p is untouched, the recurrence carries c onwards
        torch.testing.assert_close(patched[:, p], reference[:, p], atol=1e-6, rtol=0)
        assert (patched[:, p + 1] - reference[:, p + 1]).abs().max() > 1e-3
        h_only = torch.cat([torch.full((8,), 2.0), torch.zeros(8)])
        patched = backend.patch(model, ids, [Edit(Site.parse("layer0"), mask_at([p]), lambda x, w: x + h_only)])
        assert (patched[:, p] - reference[:, p]).abs().max() > 1e-3


def test_lstm_fused_latents_include_the_true_cell_state():
    """The c half reported on the fused path equals the cell state of a step-by-step lstm_cell loop."""
    model = tiny("lstm")
    ids = ids_batch()
    with torch.no_grad():
        latents = backend.collect(model, ids, ["layer0"])["hook_layers.0:output@given"]  # (B, T, 16)
        rnn = model.rnns[0]
        h = c = torch.zeros(B, 8)
        x = model.embed(ids)
        for t in range(T):
            h, c = torch.lstm_cell(x[:, t], (h, c), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                                   rnn.bias_hh_l0)
            torch.testing.assert_close(latents[:, t], torch.cat([h, c], -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_with_everything_given_equals_forward(arch):
    model = tiny(arch)
    ids = ids_batch()
    with torch.no_grad():
        tokens, logits = model.rollout(ids, torch.zeros_like(ids, dtype=torch.bool))
        assert torch.equal(tokens, ids)
        torch.testing.assert_close(logits, model(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_free_rollout_feeds_argmax_and_matches_forward_on_its_tokens(arch):
    """KV-cached / stepped decoding of the model's own predictions == teacher forcing on those tokens."""
    model = tiny(arch)
    ids = ids_batch()
    free = torch.zeros_like(ids, dtype=torch.bool)
    free[:, 5:] = True
    with torch.no_grad():
        tokens, logits = model.rollout(ids, free)
        assert torch.equal(tokens[:, :5], ids[:, :5])
        assert torch.equal(tokens[:, 5:], logits[:, 4:-1].argmax(-1))
        torch.testing.assert_close(logits, model(tokens), atol=ATOL, rtol=0)


def test_rollout_rejects_a_free_first_token():
    model = tiny("gru")
    ids = ids_batch()
    with pytest.raises(DataError, match="free_mask"):
        model.rollout(ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("arch", ARCHS)
def test_edits_during_rollout_equal_edits_during_forward(arch):
    """Hooks fire per step with absolute positions, also in the KV cache / recurrence of decoding."""
    model = tiny(arch)
    ids = ids_batch()
    shift = torch.linspace(-2, 2, 16)
    given = torch.zeros_like(ids, dtype=torch.bool)
    with torch.no_grad():
        for site in SITES[arch]:
            def edits(site=site):
                return [Edit(Site.parse(site), mask_at([3, 6]), lambda x, w: x + shift)]

            forward = backend.patch(model, ids, edits())
            with backend.edits_installed(model, edits()):
                _, decoded = model.rollout(ids, given)
            torch.testing.assert_close(decoded, forward, atol=ATOL, rtol=0)
            with backend.recording(model, [site]) as rec:
                model.rollout(ids, given)
            collected = backend.collect(model, ids, [site])
            key = next(iter(collected))
            torch.testing.assert_close(rec.result()[key], collected[key], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_golden_full_state_swap_reproduces_the_source_run(arch):
    """Swap the whole recurrent latent at p from a run with a different prefix and the same suffix:
    the target then produces exactly the source's outputs from p on."""
    model = tiny(arch)
    p = 5
    source = ids_batch(1)
    target = ids_batch(2)
    target[:, p + 1:] = source[:, p + 1:]
    with torch.no_grad():
        source_logits = model(source)
        target_logits = model(target)
        source_latents = backend.collect(model, source, ["hidden"])["hook_layers.0:output@given"]
        mask = mask_at([p])
        rows, cols = mask.nonzero(as_tuple=True)
        chosen = source_latents[rows, cols]  # (n, d) in edit-entry order
        patched = backend.patch(model, target, [Edit(Site.parse("hidden"), mask, lambda x, w: chosen[w])])
        torch.testing.assert_close(patched[:, p:], source_logits[:, p:], atol=ATOL, rtol=0)
        assert torch.equal(patched[:, :p], target_logits[:, :p])
        assert (target_logits[:, p:] - source_logits[:, p:]).abs().max() > 1e-3  # the swap did something
        # the same state handed over explicitly continues the source run
        resumed = model(source[:, p + 1:], state=source_latents[:, p], position_offset=p + 1)
        torch.testing.assert_close(resumed, source_logits[:, p + 1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("site", ["embeddings", "layer0", "layer1"])
def test_golden_transformer_swap_at_every_position_reproduces_the_source(site):
    model = tiny("transformer")
    source, target = ids_batch(1), ids_batch(2)
    with torch.no_grad():
        source_logits = model(source)
        key = str(backend.resolve(model, site))
        source_latents = backend.collect(model, source, [site])[key]  # (B, T, d)
        mask = torch.ones(B, T, dtype=torch.bool)
        rows, cols = mask.nonzero(as_tuple=True)
        chosen = source_latents[rows, cols]

        def edits():
            return [Edit(Site.parse(site), mask, lambda x, w: chosen[w])]

        torch.testing.assert_close(backend.patch(model, target, edits()), source_logits, atol=ATOL, rtol=0)
        with backend.edits_installed(model, edits()):
            _, decoded = model.rollout(target, torch.zeros_like(target, dtype=torch.bool))
        torch.testing.assert_close(decoded, source_logits, atol=ATOL, rtol=0)


def test_transformer_layer0_swap_reaches_later_positions_through_attention():
    model = tiny("transformer")
    ids = ids_batch()
    with torch.no_grad():
        reference = model(ids)
        patched = backend.patch(model, ids, [Edit(Site.parse("layer0"), mask_at([2]), lambda x, w: x * 0 + 1)])
    assert torch.equal(patched[:, :2], reference[:, :2])
    assert (patched[:, 3:] - reference[:, 3:]).abs().amax(dim=(0, 2)).min() > 1e-6


def test_transformer_refuses_a_state():
    model = tiny("transformer")
    with pytest.raises(ConfigError, match="no recurrent state"):
        model(ids_batch(), state=torch.zeros(B, 16))
    with pytest.raises(ConfigError, match="position_offset"):
        model(ids_batch(), position_offset=3)


def test_unannounced_edit_inside_a_fused_stretch_is_an_error():
    model = tiny("gru")

    def sneaky(module, args, output):
        out = output.clone()
        out[:, 2] += 1.0  # not the last step of the stretch, and edit_steps was not set
        return out

    handle = model.hook_layers[0].register_forward_hook(sneaky)
    try:
        with pytest.raises(InterventionError, match="edit_steps"):
            model(ids_batch())
    finally:
        handle.remove()


def test_bad_ids_and_state_shapes():
    model = tiny("gru")
    with pytest.raises(DataError, match="vocabulary"):
        model(torch.full((2, 3), V))
    with pytest.raises(DataError, match="state"):
        model(ids_batch(), state=torch.zeros(B, 7))
