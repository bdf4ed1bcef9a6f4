"""Models people deploy, as they have them: Hugging Face encoder and decoder models (small configs,
random init, no download) through sparsify_ / quantize_ / calibrate / sensitivity_scan / save / load,
with keyword inputs straight from a tokenizer-style dict."""

import copy

import pytest
import torch
import torch.nn as nn

import accel
from accel import QuantEmbedding, QuantLinear, SparseLinear
from accel.prune import block_masks, sensitivity_scan

transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _decoder():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batch(n=2, t=12):
    ids = torch.randint(0, 500, (n, t))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_bert_quantize_with_keyword_inputs_and_save_load(tmp_path):
    model = _bert()
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    # a dict: keyword inputs, as a tokenizer returns them (keep_float=False: convert even where int8 is slower)
    rows = accel.quantize_(model, accel.QuantConfig(keep_float=False), example_inputs=batch)
    linears = [r for r in rows if r["kind"] == "Linear"]
    assert len(linears) == 2 * 6 + 1 and all(r["input_shape"][-1] in (64, 128) for r in linears)
    assert isinstance(model.embeddings.word_embeddings, QuantEmbedding)
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantLinear)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert _cos(ref, out) > 0.995
    path = str(tmp_path / "bert.safetensors")
    accel.save(model, path)
    fresh = accel.load(_bert(), path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, out)
    names = max(len(r["layer"]) for r in rows)  # report columns fit the real names
    assert all(len(line) >= names for line in accel.format_report(rows).splitlines()[1:])


def test_bert_sparsify_sensitivity_scope_and_floor():
    model = _bert()
    batch = _batch()
    masks = block_masks(model, 0.5, block=16, scope="sensitivity", filter_fn=lambda m, n: type(m) is nn.Linear,
                        min_density=0.2, example_inputs=batch)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - 0.5 * total) <= 1
    assert all(m.sum() >= 0.2 * m.numel() - 1 for m in masks.values())
    rows = accel.sparsify_(model, accel.SparsityConfig(block=16), masks=masks, example_inputs=(batch["input_ids"],))
    assert {r["layer"] for r in rows} == set(masks)
    assert isinstance(model.encoder.layer[1].output.dense, SparseLinear)


def test_args_kwargs_form_and_calibrate_with_dict_batches():
    model = _bert()
    batch = _batch()
    ids = batch.pop("input_ids")
    scan = sensitivity_scan(model, example_inputs=((ids,), batch), sparsities=(0.5,), block=16,
                            filter_fn=lambda m, n: n.endswith("intermediate.dense"))
    assert scan[0]["metric"] == float("inf") and len(scan) == 3 and all(r["metric"] < 200 for r in scan[1:])
    scales = accel.calibrate(model, [_batch() for _ in range(2)], filter_fn=lambda m, n: type(m) is nn.Linear)
    assert len(scales) == 2 * 6 + 1 and all(s > 0 for s in scales.values())


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make, projections", [(_decoder, 4 * 2 + 1), (_llama, 7 * 2 + 1)], ids=["gpt2", "llama"])
def test_decoder_quantize_logits(make, projections):
    """GPT-2's Conv1D projections count as Linear layers; Llama's are nn.Linear without bias."""
    model = make()
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    q = copy.deepcopy(model)
    rows = accel.quantize_(q, example_inputs={"input_ids": ids})
    assert sum(r["kind"] in ("Linear", "Conv1D") for r in rows) == projections
    assert any(r["kind"] == "Embedding" for r in rows)
    with torch.no_grad():
        out = q(input_ids=ids).logits
    assert _cos(ref, out) > 0.99


def _reloads_exactly(model, make, ids, path: str):
    """``accel.save`` ``model`` to ``path``, ``accel.load`` it into ``make()``: the logits on ``ids`` are equal.
    Returns the loaded model."""
    with torch.no_grad():
        out = model(input_ids=ids).logits
    accel.save(model, path)
    fresh = accel.load(make(), path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out)
    return fresh


def _opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=64)
    return transformers.OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_opt, _decoder], ids=["opt", "gpt2"])
def test_tied_output_head_is_not_pruned_and_reloads_exactly(make, tmp_path):
    """lm_head holds the token embeddings' weight: pruning it would prune the embeddings (or, as a sparse
    copy, untie them so that a reload into a fresh, tied model writes one over the other)."""
    model = make()
    ids = torch.randint(0, 500, (2, 12))
    emb = model.get_input_embeddings().weight
    table = emb.detach().clone()
    assert model.lm_head.weight is emb
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, mode="sparse"))
    head = [r for r in rows if r["layer"] == "lm_head"]
    assert len(head) == 1 and head[0]["decision"] == "dense" and "tied" in head[0]["reason"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is emb and torch.equal(emb, table)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    # only the tied layer chosen: reported, nothing pruned, no error
    only = make()
    rows = accel.sparsify_(only, accel.SparsityConfig(sparsity=0.5, block=16), filter_fn=lambda m, n: n == "lm_head")
    assert [r["decision"] for r in rows] == ["dense"] and not any(isinstance(m, SparseLinear) for m in only.modules())
    masked = make()  # masks from a pruner naming the tied layer: not pruned either, reported
    mask = torch.ones(500 // 4, 64 // 16, dtype=torch.bool)
    rows = accel.sparsify_(masked, accel.SparsityConfig(block=16), masks={"lm_head": mask[:, :]})
    assert [r["decision"] for r in rows] == ["dense"] and "tied" in rows[0]["reason"]
    assert masked.lm_head.weight is masked.get_input_embeddings().weight
    fresh = _reloads_exactly(model, make, ids, str(tmp_path / "tied.safetensors"))
    assert fresh.lm_head.weight is fresh.get_input_embeddings().weight


def test_tied_tables_quantized_once_saved_once(tmp_path):
    """The int8 embedding and the int8 output head tied to it share one table, in memory and in the file."""
    model = _opt()
    ids = torch.randint(0, 500, (2, 12))
    accel.quantize_(model, accel.QuantConfig(keep_float=False))
    head, emb = model.lm_head, model.model.decoder.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding)
    assert head.weight_q is emb.weight_q and head.weight_scale is emb.weight_scale
    path = str(tmp_path / "q.safetensors")
    fresh = _reloads_exactly(model, _opt, ids, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert "model.decoder.embed_tokens.weight_q" in keys and "lm_head.weight_q" not in keys  # written once
    assert fresh.lm_head.weight_q is fresh.model.decoder.embed_tokens.weight_q


def test_load_refuses_untied_values_for_a_tied_model(tmp_path):
    model = _opt()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 0.5)  # untied, different values
    path = str(tmp_path / "untied.safetensors")
    accel.save(model, path)
    fresh = _opt()
    before = fresh.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        accel.load(fresh, path)
    assert torch.equal(fresh.lm_head.weight, before)  # nothing changed


def test_conv1d_kept_dense_keeps_its_type_and_reloads(tmp_path):
    """GPT-2's Conv1D pruned then kept dense (in-model check) comes back as a Conv1D holding the pruned
    weight, so the saved file fits a fresh GPT-2."""
    from accel.api import _dense_like

    model = _decoder()
    conv1d = model.transformer.h[0].mlp.c_fc
    sparse = SparseLinear.from_dense(accel.prune.as_plain(conv1d), sparsity=0.5, block=16)
    back = _dense_like(conv1d, sparse)
    assert type(back) is type(conv1d) and back.weight.shape == conv1d.weight.shape
    assert torch.equal(back.weight, sparse.to_linear().weight.t()) and torch.equal(back.bias, conv1d.bias)
    assert back.weight is not conv1d.weight and not torch.equal(back.weight, conv1d.weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sparse(x), rtol=1e-5, atol=1e-5)
    model.transformer.h[0].mlp.c_fc = back
    _reloads_exactly(model, _decoder, torch.randint(0, 500, (1, 8)), str(tmp_path / "gpt2.safetensors"))


def test_quantize_reports_layers_without_an_int8_form():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(4, 8, 3)
            self.pos = transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding(20, 8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.conv1d(x).mean(-1))

    rows = accel.quantize_(Net())
    why = {r["layer"]: r for r in rows}
    assert why["conv1d"]["decision"] == "float" and "Conv1d" in why["conv1d"]["reason"]
    assert why["pos"]["decision"] == "float" and "subclasses Embedding" in why["pos"]["reason"]
    assert isinstance(dict(Net().named_children())["fc"], nn.Linear) and "fc" in why
    mha = nn.TransformerEncoderLayer(16, 2, 32)  # out_proj keeps the stock forward (its parent reads the weight):
    row = next(r for r in accel.quantize_(mha) if r["layer"] == "self_attn.out_proj")  # kept, and said so
    assert row["decision"] == "float" and "as nn.MultiheadAttention does with out_proj" in row["reason"]
    with pytest.raises(ValueError, match="SparsityConfig.block"):
        accel.SparsityConfig(block=8)


def test_save_merges_only_the_same_memory_seen_the_same_way():
    from accel.api import _tensor_identity

    w = torch.randn(4, 4)
    assert _tensor_identity(w) == _tensor_identity(w.detach())
    assert _tensor_identity(w) != _tensor_identity(w[:, :2]) and _tensor_identity(w) != _tensor_identity(w.t())
    c = torch.randn(3, dtype=torch.complex64)
    assert _tensor_identity(c) != _tensor_identity(c.conj())
    a, b = torch.empty(4, 4, device="meta"), torch.empty(4, 4, device="meta")  # meta tensors all report address 0
    assert _tensor_identity(a) != _tensor_identity(b)


def test_conv1d_stored_dense_linearizes_to_conv1d(tmp_path):
    """sparsify_ mode 'dense' then linearize_kept_dense_ (what accel compress does before quantize_) gives
    GPT-2 its Conv1D layers back, holding the pruned weights; the saved file fits a fresh GPT-2."""
    from accel.api import linearize_kept_dense_

    model = _decoder()
    kinds = {n: type(m) for n, m in model.named_modules()}
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, mode="dense"),
                           filter_fn=lambda m, n: n.startswith("transformer.h."))
    ids = torch.randint(0, 500, (1, 8))
    with torch.no_grad():
        sparse_out = model(input_ids=ids).logits
    names = linearize_kept_dense_(model, rows)
    assert names and all(type(model.get_submodule(n)) is kinds[n] for n in names)
    fc = model.transformer.h[0].mlp.c_fc
    assert type(fc).__name__ == "Conv1D" and float((fc.weight == 0).float().mean()) >= 0.45
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, sparse_out, rtol=1e-4, atol=1e-4)
    _reloads_exactly(model, _decoder, ids, str(tmp_path / "lin.safetensors"))


def test_tied_table_split_by_a_device_move_is_saved_once(tmp_path):
    """Module.to converts each layer's buffers separately, so a shared int8 table becomes equal copies:
    save still writes it once."""
    model = _opt()
    accel.quantize_(model, accel.QuantConfig(keep_float=False))
    head, emb = model.lm_head, model.model.decoder.embed_tokens
    for key in ("weight_q", "weight_scale"):  # what .to(device) / .cuda() leave: one copy per layer
        head._buffers[key] = head._buffers[key].clone()
    assert head.weight_q is not emb.weight_q and torch.equal(head.weight_q, emb.weight_q)
    path = str(tmp_path / "moved.safetensors")
    _reloads_exactly(model, _opt, torch.randint(0, 500, (2, 12)), path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert sum(k.endswith("weight_q") and ("lm_head" in k or "embed_tokens" in k) for k in f.keys()) == 1
