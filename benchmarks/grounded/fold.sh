#!/usr/bin/env bash
# fold.sh NAME FOLDS_DIR F [--set ...]: train the main job's recipe (torch backend) on FOLDS_DIR/fold-F (made by
# folds.py) and score its held questions with no hand-written rules; the --set options go to both (another KB needs
# its data.kb at eval too); writes /tmp/fr/NAME-fF/ev (report.json) and
# /tmp/fr/NAME-fF.{train,eval}.log.
name=$1; folds=$2; f=$3; shift 3
D=$folds/fold-$f; R=/tmp/fr/$name-f$f; mkdir -p /tmp/fr
${PY:-python3} -m mlx_lora train --data $D --out $R --no-progress --set backend.name=torch \
  --set train.max_length=320 --set train.epochs=20 --set train.max_steps=120 --set train.first_token_weight=5 \
  --set train.lr=5e-4 --set train.warmup_steps=3 --set train.precision=auto --set lora.num_layers=12 \
  --set train.grad_accum=1 --set train.batch_size=2 "$@" > $R.train.log 2>&1 || echo "TRAIN FAIL $?" >> $R.train.log
${PY:-python3} -m mlx_lora eval --adapter $R --data $D/held.jsonl --rules none \
  --variants tuned,tuned_rules,retrieval,top_passage --out $R/ev --no-progress \
  --set generate.batch_size=64 --set generate.max_new_tokens=100 --set backend.name=torch "$@" > $R.eval.log 2>&1 || echo "EVAL FAIL $?" >> $R.eval.log
echo "$name fold $f done $(date +%T)"
