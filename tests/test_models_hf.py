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
