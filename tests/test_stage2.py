"""
Stage 2 from the export with the ecosystem's trainer (export/stage2.py, `bench.py stage2`), on
the CPU demo: TRL's SFTTrainer on the exported folder, LoRA on the LLM with the connector
trainable, on (image, question, answer) chat rows made from the demo data; the loss finite and
falling, the result saved and loaded back; and the whole bench on a handful of steps. Skipped
where trl or peft is not installed (CI installs them).

$ python -m pytest -q tests/test_stage2.py
"""
import json
import math

import pytest
import torch

pytest.importorskip('trl')
pytest.importorskip('peft')

from conftest import assert_ok, run_script  # noqa: E402
from evaluation import evaluate  # noqa: E402
from export import hf, stage2 as S  # noqa: E402
from sources.synthetic import groups_of, qa_lines  # noqa: E402


@pytest.fixture(scope='module')
def exported(demo_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stage2') / 'hf'
    hf.export_hf(str(demo_run / 'ckpt.pt'), str(folder), torch.float32)
    return folder


def test_instruction_rows_ask_what_the_qa_set_asks(synthetic):
    """Four rows an image, in TRL's prompt-completion form: describe (its caption), what is in
    it, the colour and the number of a shape, each answer read from the scene its caption names
    and accepted by the QA scoring."""
    from evaluation import metrics
    pairs = S.scenes(str(synthetic), 'train', 20)
    rows = S.instruction_rows(pairs)
    assert len(rows) >= 3 * len(pairs)
    first = [r for r in rows if r['images'] == [pairs[0][0]]]
    assert first[0]['prompt'][0]['content'][1]['text'] == S.DESCRIBE
    assert first[0]['completion'][0]['content'][0]['text'] == pairs[0][1]
    for r in rows:
        q, a = r['prompt'][0]['content'][1]['text'], r['completion'][0]['content'][0]['text']
        if q == S.DESCRIBE:
            continue
        groups = groups_of(next(c for p, c in pairs if [p] == r['images']))
        accepted = next(x['answers'] for x in qa_lines(r['images'][0], groups, '') if x['question'] == q)
        assert metrics.qa_scores([a], [accepted])['accuracy'] == 1.0, (q, a, accepted)


def test_sft_with_lora_and_the_connector_trainable(exported, synthetic, tmp_path):
    """A few SFTTrainer steps on 4 images' rows: the loss is finite and falls; only the LoRA
    matrices of the LLM's attention and the connector train; saved (adapter + connector) and
    loaded back onto the export, it answers as the trained model does."""
    rows = S.instruction_rows(S.scenes(str(synthetic), 'train', 4))
    model, processor, curve = S.sft(str(exported), rows, str(tmp_path / 'adapter'), steps=24, batch_size=8, lr=3e-3,
                                    log_every=4)
    losses = [v for _, v in curve]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any('lora_A' in n for n in trainable) and any('connector' in n for n in trainable)
    assert all('lora_' in n or '.connector.' in n for n in trainable), trainable[:5]
    assert not any('vision_tower' in n or 'lm_head' in n for n in trainable)
    val = [(p, q) for p, _ in S.scenes(str(synthetic), 'val', 3) for q in (S.DESCRIBE, 'What is in the image?')]
    before = S.generate(model, processor, val)
    again = S.generate(*S.load(str(exported), str(tmp_path / 'adapter')), val)
    assert before == again
    base = S.generate(*S.load(str(exported)), val)
    assert base != before  # stage 2 changed the model


def test_evaluate_model_scores_with_the_project_metrics(exported, synthetic):
    """The stage-2 scores are the project's: CIDEr-D of the describe answers and the QA
    accuracies, from evaluation/metrics.py on the rows the model's answers make."""
    from evaluation import metrics
    model, processor = S.load(str(exported))
    val = S.scenes(str(synthetic), 'val', 6)
    qa = evaluate.read_qa(str(synthetic.parent / 'qa.jsonl'))[:12]
    m, rows = S.evaluate_model(model, processor, val, qa)
    caps = [r for r in rows if 'references' in r]
    assert m['cider_d'] == pytest.approx(metrics.cider_d([r['generation'] for r in caps],
                                                         [r['references'] for r in caps])[0])
    assert m['qa_accuracy'] == pytest.approx(sum(r['correct'] for r in rows if 'answers' in r) / 12)
    assert set(m['qa_lenient_by_kind']) == set(m['qa_by_kind'])


def test_bench_stage2_runs_both_arms(demo_run, synthetic, tmp_path):
    """`bench.py stage2` on the tiny demo, a handful of steps: stage 1 alone and both stage-2
    arms scored, the table, the loss curves, one image's answers."""
    p = run_script(['bench.py', 'stage2', '--ckpt', demo_run / 'ckpt.pt', '--data_dir', synthetic, '--steps', '6',
                    '--n', '6', '--out_dir', tmp_path], timeout=900)
    assert_ok(p)
    assert '| | stage 1 only | stage 2 from stage 1 | stage 2 from an untrained connector |' in p.stdout
    out = json.loads((tmp_path / 'stage2' / 'stage2.json').read_text())
    assert set(out['arms']) == {'stage 1 only', 'stage 2 from stage 1', 'stage 2 from an untrained connector'}
    assert all(len(c) == 6 for c in out['curves'].values()) and (tmp_path / 'stage2' / 'stage2_loss.png').exists()
    assert len(out['example']['answers']['stage 2 from stage 1']) == len(out['example']['questions']) == 4


def test_bench_stage2_without_a_checkpoint_says_how_to_make_one(tmp_path):
    p = run_script(['bench.py', 'stage2', '--ckpt', tmp_path / 'none.pt', '--out_dir', tmp_path])
    assert p.returncode == 1 and 'config/stage1_smollm2.py' in p.stderr and 'Traceback' not in p.stderr


def test_the_commands_of_docs_stage2_run_as_written(exported, synthetic, tmp_path):
    """docs/stage2.md's Python blocks, as written, in a folder laid out as after the README's
    demo and the export (data/synthetic, out-tiny/hf): loading, captioning, the pipeline, and
    stage 2 with SFTTrainer, LoRA and the connector, saved."""
    import re
    import shutil
    from conftest import ROOT
    from test_export import fresh_python
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'synthetic').symlink_to(synthetic.parent)
    (tmp_path / 'out-tiny').mkdir()
    shutil.copytree(exported, tmp_path / 'out-tiny' / 'hf')
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / 'docs' / 'stage2.md').read_text(), re.S)
    assert len(blocks) == 2
    for code in blocks:
        assert_ok(fresh_python(['-c', code], tmp_path, timeout=600))
    assert (tmp_path / 'out-tiny' / 'stage2' / 'adapter_model.safetensors').exists()
