"""
Stage 2 from the transformers export, with TRL: instruction rows made from the synthetic demo
data, SFTTrainer with LoRA on the LLM and the connector trainable in full, and the evaluation
of an exported or fine-tuned model with the project's metrics (evaluation/metrics.py), through
a generate function. `compare` (`python bench.py stage2`) runs it from a stage-1 checkpoint and an
untrained connector side by side; docs/stage2.md says how to start stage 2 on other data.
trl and peft are optional packages: only this file imports them.
"""
import os

import torch

from configurator import UserError
from evaluation import metrics

DESCRIBE = 'Describe the image in one sentence.'
# LoRA on the LLM's attention projections; the connector is trained in full and saved with the adapter
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=r'.*language_model.*\.(q_proj|k_proj|v_proj|o_proj)',
            modules_to_save=['connector'])


def require_trl():
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise UserError(f'stage 2 needs trl and peft ({e.name} is not installed): pip install trl peft') from None


def user(text, n_images=1):
    return [{'role': 'user', 'content': [{'type': 'image'}] * n_images + [{'type': 'text', 'text': text}]}]


def scenes(prepared_dir, split, num=0):
    """[(image path, caption)] of the single-image samples of a prepared synthetic dataset
    (the first num of them; 0: all)."""
    import data
    from sources.backbones import load_tokenizer
    prepared = data.open_prepared(prepared_dir)
    if prepared['meta'].get('source') != 'synthetic':
        raise UserError(f'{prepared_dir} is not a synthetic dataset (prepare_llava.py --synthetic): stage 2 here '
                        f'asks questions about its drawn scenes')
    tok = load_tokenizer(prepared['meta']['tokenizer'])
    tokens, index = prepared[split]
    out = []
    for off, n, i0, i1 in index.tolist():
        if i1 < 0:
            path = os.path.abspath(os.path.join(prepared['root'], prepared['image_paths'][i0].decode()))
            out.append((path, tok.decode(tokens[off:off + n].tolist(), skip_special_tokens=True).strip()))
            if num and len(out) == num:
                break
    return out


def instruction_rows(pairs):
    """TRL's prompt-completion rows, four per image: "describe" (its caption) and a question of
    each kind the demo's QA set asks (what is in it, the colour and the number of a shape),
    answered from the scene its caption names. The completion alone is trained on."""
    from sources.synthetic import COUNT_WORDS, PLURALS, groups_of, qa_lines
    rows = []
    for path, caption in pairs:
        groups = groups_of(caption)
        if groups is None:
            continue
        what = ' and '.join(f'{COUNT_WORDS[c] if c > 1 else ("an" if col[0] in "aeiou" else "a")} {col} '
                            f'{PLURALS[s] if c > 1 else s}' for c, col, s in groups)
        qa = [(DESCRIBE, caption)] + [(q['question'], what if metrics.question_kind(q['question']) == 'what' else
                                       q['answers'][0]) for q in qa_lines(path, groups, '')]
        rows += [dict(images=[path], prompt=user(q), completion=[{'role': 'assistant', 'content':
                                                                 [{'type': 'text', 'text': a}]}]) for q, a in qa]
    return rows


def load(folder, adapter=None, device='cpu'):
    """(model, processor) of an exported folder, with a stage-2 adapter (LoRA + connector) on it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval(), AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def sft(folder, rows, out_dir, steps, batch_size=8, lr=1e-3, seed=1337, log_every=10):
    """TRL's SFTTrainer on an exported folder: LoRA on the LLM, the connector trainable, for
    `steps` steps on `rows`; the adapter (with the connector) saved to out_dir. Returns
    (model, processor, [(step, loss)])."""
    require_trl()
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    model, processor = load(folder)
    gpu = torch.cuda.is_available()
    args = SFTConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                     lr_scheduler_type='cosine', warmup_steps=max(1, steps // 20), logging_steps=log_every, seed=seed,
                     use_cpu=not gpu, bf16=gpu, gradient_checkpointing=False, max_length=None, report_to='none',
                     save_strategy='no', dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model.train(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=processor, peft_config=LoraConfig(**LORA))
    trainer.train()
    trainer.save_model(out_dir)
    curve = [(r['step'], r['loss']) for r in trainer.state.log_history if 'loss' in r]
    return trainer.model.eval(), processor, curve


def generate(model, processor, pairs, batch_size=16, max_new_tokens=24):
    """Greedy answers: pairs of (image path, question) -> one line of text each."""
    from PIL import Image
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        prompts = [processor.apply_chat_template(user(q), add_generation_prompt=True) for _, q in chunk]
        enc = processor(images=[[Image.open(p)] for p, _ in chunk], text=prompts, return_tensors='pt', padding=True,
                        padding_side='left').to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        n = enc['input_ids'].shape[1]
        out += [' '.join(processor.decode(g[n:], skip_special_tokens=True).split()) for g in gen]
    return out


def evaluate_model(model, processor, val, qa, batch_size=16):
    """The project's scores of a model on held-out images: CIDEr-D (and BLEU-4) of its
    "describe" answers against the captions, strict and lenient QA accuracy by question kind
    (evaluation/metrics.py). val: [(image, caption)]; qa: read_qa rows. Returns (metrics, rows)."""
    captions = generate(model, processor, [(p, DESCRIBE) for p, _ in val], batch_size)
    cap_rows = [dict(image=p, generation=g, references=[c]) for (p, c), g in zip(val, captions)]
    answers = generate(model, processor, [(r['image'], r['question']) for r in qa], batch_size)
    qa_rows = [dict(r, generation=g) for r, g in zip(qa, answers)]
    m = metrics.score_rows(cap_rows)
    m = dict(cider_d=m['cider_d'], bleu4=m['bleu4'], **metrics.score_rows(qa_rows))
    kinds = {}
    for r in qa_rows:
        kinds.setdefault(metrics.question_kind(r['question']), []).append(r['contains'])
    m['qa_lenient_by_kind'] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    return m, cap_rows + qa_rows


def untrained_checkpoint(ckpt_path, out_path, seed=1337):
    """A checkpoint of the same model keys with the connector as training initialises it (the
    baseline sample.py --baseline uses): stage 2 from it is stage 2 without stage 1."""
    import sample
    vlm, _, ckpt = sample.from_checkpoint(ckpt_path)
    state = sample.untrained_connector(vlm, ckpt['model_args'], seed)
    torch.save(dict(model_args=ckpt['model_args'], connector=state, config=ckpt.get('config', {}), iter_num=0),
               out_path)
    return out_path


def compare(ckpt, prepared, out, steps, batch, lr, n_val=100):
    """`bench.py stage2`: stage 1 alone, then the same stage 2 from the stage-1 checkpoint and
    from the same backbones with a freshly initialised connector, each exported with export_hf
    and fine-tuned with sft; scored on n_val val images (describe) and the QA set. Prints the
    table and one val image's answers from each; writes the loss curves (stage2_loss.png) and
    the numbers (stage2.json) to out."""
    import json
    import time

    from evaluation import evaluate, report
    from export import hf
    os.makedirs(out, exist_ok=True)
    rows = instruction_rows(scenes(prepared, 'train'))
    val = scenes(prepared, 'val', n_val)
    qa = evaluate.read_qa(os.path.join(os.path.dirname(os.path.abspath(prepared)), 'qa.jsonl'))
    print(f'stage 2: {len(rows):,} instruction rows ({steps} steps of {batch} = {steps * batch / len(rows):.2f} '
          f'epochs); scored on {len(val)} val images (describe) and {len(qa)} QA questions', flush=True)
    arms, curves, times, answers = {}, {}, {}, {}
    sources = dict(stage1=ckpt, untrained=untrained_checkpoint(ckpt, os.path.join(out, 'untrained.pt')))
    example = val[0][0]
    example_qs = [DESCRIBE] + [r['question'] for r in qa if r['image'] == example][:3]
    for name, source in sources.items():
        folder = os.path.join(out, f'export-{name}')
        hf.export_hf(source, folder, dtype=torch.float32, force=True)
        if name == 'stage1':  # stage 1 alone: the export as it is
            model, processor = load(folder)
            arms['stage 1 only'], _ = evaluate_model(model, processor, val, qa)
            answers['stage 1 only'] = generate(model, processor, [(example, q) for q in example_qs])
        t0 = time.time()
        model, processor, curves[name] = sft(folder, rows, os.path.join(out, f'adapter-{name}'), steps, batch, lr,
                                             log_every=max(1, steps // 50))
        times[name] = time.time() - t0
        label = f'stage 2 from {"stage 1" if name == "stage1" else "an untrained connector"}'
        arms[label], _ = evaluate_model(model, processor, val, qa)
        answers[label] = generate(model, processor, [(example, q) for q in example_qs])
        print(f'{label}: {steps} steps in {times[name] / 60:.1f} min, last loss {curves[name][-1][1]:.3f}', flush=True)
    kinds = sorted({k for m in arms.values() for k in m['qa_by_kind']})
    table = ['| | ' + ' | '.join(arms) + ' |', '|---' * (len(arms) + 1) + '|']
    fmt = lambda x: metrics.fmt(x, 3)  # noqa: E731
    table.append('| CIDEr-D (describe) | ' + ' | '.join(fmt(m['cider_d']) for m in arms.values()) + ' |')
    table.append('| QA accuracy, strict | ' + ' | '.join(fmt(m['qa_accuracy']) for m in arms.values()) + ' |')
    table.append('| QA accuracy, lenient | ' + ' | '.join(fmt(m['qa_contains_lenient']) for m in arms.values()) + ' |')
    for k in kinds:
        table.append(f'| {k}: strict / lenient | ' + ' | '.join(f"{fmt(m['qa_by_kind'].get(k))} / "
                                                               f"{fmt(m['qa_lenient_by_kind'].get(k))}"
                                                               for m in arms.values()) + ' |')
    print('\n' + '\n'.join(table))
    print(f'\n{example}: (reference: {val[0][1]!r})')
    for label, said in answers.items():
        print(f'  {label}: ' + ' | '.join(f'{q} -> {a!r}' for q, a in zip(example_qs, said)))
    records = [{'iter': s, 'from_stage1': v} for s, v in curves['stage1']] + \
        [{'iter': s, 'from_untrained': v} for s, v in curves['untrained']]
    plot = os.path.join(out, 'stage2_loss.png')
    report.plot_losses(records, plot, plotted=[('from_stage1', 'stage 2 from stage 1', (31, 119, 180)),
                                               ('from_untrained', 'from an untrained connector', (214, 39, 40))])
    with open(os.path.join(out, 'stage2.json'), 'w') as f:
        json.dump(dict(arms=arms, curves=curves, minutes={k: v / 60 for k, v in times.items()}, steps=steps,
                       batch_size=batch, rows=len(rows), example=dict(image=example, questions=example_qs,
                                                                      answers=answers)), f, indent=2, default=float)
    print(f'\nloss curves: {plot}; numbers: {os.path.join(out, "stage2.json")}')
