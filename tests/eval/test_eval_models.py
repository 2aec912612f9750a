"""Model-facing evaluation: log-likelihoods, greedy generation, evaluators and `rerule eval`.

Two tiny models: a bigram "model" whose logits are a known table (so every
token log-prob can be computed by hand), and a 2-layer Llama built from a
config, run in float64 so batched and unbatched paths agree to rounding.
"""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rerule.data import FIXTURES, load_task, synthetic_world
from rerule.eval import (
    answer_logprobs,
    evaluate_synthetic,
    evaluate_tofu,
    generate_greedy,
    mean_logprob,
    min_k_prob,
    model_utility,
    rouge_l,
)
from rerule.eval.cli import add_eval_parser, run_eval
from rerule.eval.tofu import SETS


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = synthetic_world(n_forget=2, n_boundary=2, n_retain=2).corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: each token's log-prob is log_softmax(table[prev])[next]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


def test_answer_logprobs_match_hand_computation_on_a_bigram(tok):
    table = torch.randn(len(tok), len(tok), dtype=torch.float64) * 3
    model = Bigram(table)
    prompts = ["Question: Where was Ada Lark born?\nAnswer:", "Question: Who?\nAnswer:", ""]
    answers = ["Velmora", "Ilse Marrow taught her", "a bare text for Min-K"]
    got = answer_logprobs(model, tok, prompts, answers, batch_size=2)
    t = table.numpy()
    for p, a, lp in zip(prompts, answers, got):
        full = tok(p + (" " if p else "") + a).input_ids
        start = len(tok(p).input_ids) if p else 1  # after the BOS for a bare text
        want = [_log_softmax(t[full[i - 1]])[full[i]] for i in range(start, len(full))]
        np.testing.assert_allclose(lp, want, rtol=1e-12)
    # Batching and padding do not change a single value.
    for bs in (1, 3):
        for a, b in zip(got, answer_logprobs(model, tok, prompts, answers, batch_size=bs)):
            np.testing.assert_allclose(a, b, rtol=1e-12)
    means = mean_logprob(model, tok, prompts, answers, batch_size=3)
    np.testing.assert_allclose(means, [lp.mean() for lp in got])
    # Min-K% of the bare text, the known answer: the mean of the int(0.4 n) smallest log-probs.
    lp = got[2]
    assert min_k_prob(lp) == pytest.approx(np.sort(lp)[: int(0.4 * lp.size)].mean())


def test_answer_logprobs_end_of_sequence_and_details_on_a_bigram(tok):
    table = torch.randn(len(tok), len(tok), dtype=torch.float64) * 3
    model, t, eos = Bigram(table), table.numpy(), tok.eos_token_id
    prompts = ["Question: Where was Ada Lark born?\nAnswer:", ""]
    answers = ["Velmora", "a bare text for Min-K"]
    rows = answer_logprobs(model, tok, prompts, answers, batch_size=2, append_eos=True, details=True)
    plain = answer_logprobs(model, tok, prompts, answers, batch_size=2)
    for p, a, row, lp0 in zip(prompts, answers, rows, plain):
        full = tok(p + (" " if p else "") + a).input_ids + [eos]  # TOFU: one EOS after the answer
        start = len(tok(p).input_ids) if p else 1
        dist = [_log_softmax(t[full[i - 1]]) for i in range(start, len(full))]
        want = [d[full[i]] for d, i in zip(dist, range(start, len(full)))]
        np.testing.assert_allclose(row["logprob"], want, rtol=1e-12)
        np.testing.assert_allclose(row["logprob"][:-1], lp0, rtol=1e-12)  # the answer tokens are unchanged
        assert row["target"][-1] == eos and row["logprob"].size == lp0.size + 1
        mu = [float(np.exp(d) @ d) for d in dist]
        np.testing.assert_allclose(row["mu"], mu, rtol=1e-10)
        np.testing.assert_allclose(row["sigma2"], [float(np.exp(d) @ d**2) - m**2 for d, m in zip(dist, mu)],
                                   rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(row["argmax"], [int(np.argmax(d)) for d in dist])
    # TOFU's probability exp(mean) now averages over the EOS token too.
    np.testing.assert_allclose(
        mean_logprob(model, tok, prompts, answers, append_eos=True), [r["logprob"].mean() for r in rows]
    )
    # Truncation at max_length leaves no room for the EOS (TOFU adds it only below max_length).
    n = len(tok("a bare text for Min-K").input_ids)
    (cut,) = answer_logprobs(model, tok, [""], ["a bare text for Min-K"], max_length=n, append_eos=True)
    assert cut.size == n - 1


def test_rwku_mia_statistics_on_a_bigram(tok):
    import zlib

    from rerule.data.schema import ProbeRecord, ProbeSet
    from rerule.eval.rwku import mia_statistics

    table = torch.randn(len(tok), len(tok), dtype=torch.float64) * 2
    model, t = Bigram(table), table.numpy()
    texts = ["Ada Lark was born in Velmora and wrote gothic mysteries.", "Basil Orwen lived in Duskvale."]
    probe = ProbeSet("mia_forget", [ProbeRecord("", x, kind="text") for x in texts], ("min_k_prob",), "{prompt}")
    got = mia_statistics(model, tok, probe, probe.records, batch_size=2)
    for i, x in enumerate(texts):
        ids = tok(x).input_ids
        dist = [_log_softmax(t[ids[j - 1]]) for j in range(1, len(ids))]
        lp = np.array([d[ids[j]] for d, j in zip(dist, range(1, len(ids)))])
        mu = np.array([np.exp(d) @ d for d in dist])
        sd = np.sqrt(np.array([np.exp(d) @ d**2 for d in dist]) - mu**2)
        z = np.sort((lp - mu) / sd)
        assert got["loss"][i] == pytest.approx(lp.mean(), rel=1e-12)  # RWKU: -(mean token loss)
        assert got["zlib"][i] == pytest.approx(lp.mean() / len(zlib.compress(x.encode())), rel=1e-12)
        assert got["min_k_pp"][i] == pytest.approx(z[: max(1, int(0.2 * z.size))].mean(), rel=1e-8)


def test_answer_logprobs_truncation_and_checks(tok):
    model = Bigram(torch.zeros(len(tok), len(tok), dtype=torch.float64))
    long = "word " * 50
    (lp,) = answer_logprobs(model, tok, [""], [long], max_length=10)
    # Uniform logits: every kept token has log-prob -log V; 10 tokens minus the BOS.
    np.testing.assert_allclose(lp, np.full(9, -np.log(len(tok))))
    (empty,) = answer_logprobs(model, tok, ["Question: " + long + "\nAnswer:"], ["x"], max_length=10)
    assert empty.size == 0
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_logprobs(model, tok, ["a", "b"], ["c"])


def _manual_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt").input_ids
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, -n:], skip_special_tokens=True)


def test_generate_greedy_left_padding_matches_unbatched(tok, llama):
    prompts = [
        "Question: Where was Ada Lark born?\nAnswer:",
        "Hi",
        "Question: Who taught Mira Tolvane?\nAnswer:",
    ]
    side = tok.padding_side
    got = generate_greedy(llama, tok, prompts, max_new_tokens=6, batch_size=3)
    assert tok.padding_side == side
    with torch.no_grad():
        want = [_manual_greedy(llama, tok, p, 6) for p in prompts]
    assert got == want
    cut = generate_greedy(llama, tok, prompts, max_new_tokens=6, batch_size=2, stop_at_newline=True)
    assert cut == [w.split("\n", 1)[0] for w in want]


def test_evaluate_synthetic_wiring(monkeypatch):
    task = synthetic_world(seed=0, n_forget=2, n_boundary=2, n_retain=2, n_attributes=2, n_templates=1)

    def replies(model, tokenizer, probe, recs, **kw):
        if probe.name == "forget":  # half refused, half leaked
            return ["I don't know." if i % 2 else r.answer for i, r in enumerate(recs)]
        if probe.name == "boundary":  # one over-refusal, the rest right
            return ["I'm not sure."] + [r.answer for r in recs[1:]]
        return ["wrong"] * len(recs)

    monkeypatch.setattr("rerule.eval.common.probe_replies", replies)
    m = evaluate_synthetic(None, None, task)
    assert m == pytest.approx(
        {
            "forget_leak": 0.5,
            "forget_refusal_rate": 0.5,
            "boundary_quality": 0.75,
            "boundary_over_refusal": 0.25,
            "retain_quality": 0.0,
            "retain_refusal_rate": 0.0,
        }
    )


def test_evaluate_tofu_against_direct_forward(tok, llama):
    task = load_task("tofu", forget="forget01", data_dir=FIXTURES / "tofu", questions_per_author=4)
    m, s = evaluate_tofu(
        llama, tok, task, batch_size=3, max_examples=3, max_new_tokens=3, return_samples=True
    )

    def p(prompt, answer):
        # One unpadded forward per sequence; slice the answer by the prompt's own token count. TOFU
        # scores the end-of-sequence token after the answer too.
        full = tok(prompt + " " + answer + tok.eos_token, return_tensors="pt").input_ids
        n = len(tok(prompt).input_ids)
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=full).logits[0], -1)
        return float(torch.exp(lp[n - 1 : -1].gather(-1, full[0, n:, None]).mean()))

    for name in SETS:
        probe = task.probes[name]
        for i, r in enumerate(probe.records[:3]):
            q = probe.format(r)
            base = p(q, r.paraphrased_answer or r.answer)
            pert = np.exp(np.mean([np.log(p(q, a)) for a in r.perturbed_answers]))
            assert s[f"{name}_truth_ratios"][i] == pytest.approx(pert / base, rel=1e-9)
        recs = probe.records[:3]
        assert m[f"{name}_rouge_l_recall"] == pytest.approx(
            np.mean(rouge_l(s[f"{name}_replies"], [r.answer for r in recs]).recall)
        )
    ra = task.probes["real_authors"].records[:3]
    probs = []
    for r in ra:
        q = task.probes["real_authors"].format(r)
        pa = p(q, r.answer)
        probs.append(pa / (pa + sum(p(q, a) for a in r.perturbed_answers)))
    assert m["real_authors_prob"] == pytest.approx(np.mean(probs), rel=1e-9)
    tr = np.array(s["forget_truth_ratios"])
    assert m["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(tr, 1 / tr)))
    assert m["model_utility"] == pytest.approx(
        model_utility({k: m[k] for k in m if not k.startswith("forget") and k != "model_utility"})
    )
    assert "forget_quality" not in m


@pytest.fixture(scope="module")
def saved(tok, llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    llama.float().save_pretrained(path)
    llama.double()
    tok.save_pretrained(path)
    return path


def _args(*argv):
    parser = argparse.ArgumentParser(prog="rerule")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_rerule_eval_tofu_report_serves_as_retain_log(saved, tmp_path, capsys):
    common = ["--model", str(saved), "--benchmark", "tofu", "--data-dir", str(FIXTURES / "tofu"),
              "--config", "forget01", "--max-examples", "3", "--max-new-tokens", "3",
              "--no-progress"]
    first = tmp_path / "retain.json"
    report = run_eval(_args(*common, "--out", str(first)))
    on_disk = json.loads(first.read_text())
    assert on_disk["metrics"] == pytest.approx(report["metrics"])
    assert len(on_disk["samples"]["forget_truth_ratios"]) == 3 and on_disk["task"] == "tofu/forget01"
    assert "model_utility" in capsys.readouterr().out
    second = run_eval(_args(*common, "--retain-log", str(first), "--out", str(tmp_path / "b.json")))
    assert second["metrics"]["forget_quality"] == pytest.approx(1.0)  # same model, same truth ratios
    m = report["metrics"]
    assert 0.0 < m["forget_extraction_strength"] <= 1.0
    assert m["privleak_reference_auc"] == 0.5 and m["privleak"] == pytest.approx((m["privleak_auc"] - 0.5) / 0.5 * 100)
    # The retain model's AUC becomes the reference: the same model leaks 0.
    assert second["metrics"]["privleak_reference_auc"] == pytest.approx(m["privleak_auc"])
    assert second["metrics"]["privleak"] == pytest.approx(0.0)


def test_rerule_eval_muse_rwku_synthetic(saved, tmp_path):
    base = ["--model", str(saved), "--max-examples", "2", "--max-new-tokens", "3", "--no-progress"]
    muse = run_eval(_args(*base, "--benchmark", "muse", "--data-dir", str(FIXTURES / "muse_books"),
                          "--out", str(tmp_path / "muse.json")))
    m = muse["metrics"]
    assert set(m) >= {"knowmem_forget_rouge_l_f1", "verbmem_forget_rouge_l_f1", "privleak_auc", "privleak"}
    assert m["privleak_reference_auc"] == 0.5393  # MUSE's published Books reference without --retain-log
    ref = run_eval(_args(*base, "--benchmark", "muse", "--data-dir", str(FIXTURES / "muse_books"),
                         "--retain-log", str(tmp_path / "muse.json"),
                         "--out", str(tmp_path / "m2.json")))
    assert ref["metrics"]["privleak_reference_auc"] == pytest.approx(m["privleak_auc"])
    assert ref["metrics"]["privleak"] == pytest.approx(0.0)
    rwku = run_eval(_args(*base, "--benchmark", "rwku", "--data-dir", str(FIXTURES / "rwku"),
                          "--out", str(tmp_path / "rwku.json")))
    assert set(rwku["metrics"]) >= {
        "forget_level3_rouge_l_recall",
        "neighbor_level1_rouge_l_recall",
        "mia_forget_loss", "mia_forget_zlib", "mia_forget_min_k_pp",
        "mia_retain_loss", "mia_retain_zlib", "mia_retain_min_k_pp",
    }
    assert "mia_auc" not in rwku["metrics"]  # RWKU reports per-set means, no AUC
    syn = run_eval(
        _args(*base, "--benchmark", "synthetic", "--hardness", "0.3", "--out", str(tmp_path / "s.json"))
    )
    assert set(syn["metrics"]) == {
        "forget_leak", "forget_refusal_rate", "boundary_quality",
        "boundary_over_refusal", "retain_quality", "retain_refusal_rate",
    }
    assert syn["args"]["hardness"] == 0.3
    with pytest.raises(ValueError, match="--retain-log is used by tofu and muse"):
        run_eval(_args(*base, "--benchmark", "synthetic", "--retain-log", str(tmp_path / "s.json")))
