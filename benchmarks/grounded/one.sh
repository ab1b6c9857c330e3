#!/usr/bin/env bash
# one.sh NAME DATA STEPS WEIGHT [--set ...]: train one sweep config (torch backend) and score it on valid with no
# hand-written rules; writes /tmp/sw/NAME.json (figures) and /tmp/sw/NAME.{train,eval}.log.
name=$1; data=$2; steps=$3; weight=$4; shift 4
R=/tmp/sw/$name; mkdir -p /tmp/sw
ml=320; [ "$data" = closed ] && ml=192
t0=$(date +%s.%N)
${PY:-python3} -m mlx_lora train --data ${DATA_ROOT:-runs/sweep-data}/$data --out $R --no-progress --set backend.name=torch \
  --set train.max_length=$ml --set train.epochs=20 --set train.max_steps=$steps --set train.first_token_weight=$weight \
  --set train.lr=5e-4 --set train.warmup_steps=3 --set train.precision=auto "$@" > /tmp/sw/$name.train.log 2>&1 || echo "TRAIN FAIL $?" >> /tmp/sw/$name.train.log
t1=$(date +%s.%N)
${PY:-python3} -m mlx_lora eval --adapter $R --data ${DATA_ROOT:-runs/sweep-data}/$data/valid.jsonl --rules none \
  --variants tuned,tuned_rules,retrieval,top_passage --out $R/ev --no-progress \
  --set generate.batch_size=64 --set generate.max_new_tokens=100 --set backend.name=torch ${EVAL_EXTRA:-} "$@" > /tmp/sw/$name.eval.log 2>&1 || echo "EVAL FAIL $?" >> /tmp/sw/$name.eval.log
t2=$(date +%s.%N)
${PY:-python3} - "$name" "$R" "$t0" "$t1" "$t2" "$data" "$steps" "$weight" "$*" <<'PY'
import json, sys
name, R, t0, t1, t2, data, steps, weight, extra = sys.argv[1:]
out = {"name": name, "data": data, "steps": int(steps), "weight": float(weight), "extra": extra,
       "train_s": round(float(t1) - float(t0), 1), "eval_s": round(float(t2) - float(t1), 1)}
try:
    r = json.load(open(f"{R}/ev/report.json"))
    for v, a in r["variants"].items():
        a = a["aggregate"]
        out[v] = {k: a.get(k) for k in ("mean_similarity", "refusal_accuracy", "answerable_refused", "topic_accuracy", "model_carried", "model_carried_answers", "model_carried_refusals", "sources")}
    s = json.load(open(f"{R}/summary.json"))
    out["train"] = {k: s.get(k) for k in ("best_eval_loss", "train_loss_last", "tokens_per_s", "elapsed_s", "device", "health", "steps")}
except Exception as e:
    out["error"] = repr(e)
open(f"/tmp/sw/{name}.json", "w").write(json.dumps(out, ensure_ascii=False) + "\n")
print(name, "done", out.get("train_s"), out.get("eval_s"), out.get("error", ""))
PY
