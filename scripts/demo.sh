#!/usr/bin/env bash
# The `make demo` walk-through: sample logs -> train -> register -> serve -> query -> events ->
# user operations (segments, a profile, stage-aware lists, an audience) -> stop.
# Everything stays in this folder: demo-data/ for logs, mlflow.db + mlruns/ for the embedded
# MLflow store (unless MLFLOW_TRACKING_URI is set), events.db for the event store (unless
# AFFINITY_EVENTS_URI is set).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=demo-data

echo "== 1. Generate sample interaction logs"
$BIN/affinity generate --out "$DATA" --users 3000 --items 800 --interactions 120000 --seed 7

echo "== 2. Train: choose the algorithm on a validation split, evaluate against popularity, log to MLflow, register"
$BIN/affinity train --interactions "$DATA/interactions.parquet" --items "$DATA/items.parquet" \
    --json | tail -n 1 > "$DATA/train-summary.json"
$BIN/python - "$DATA/train-summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"run {s['run_id']} registered {s['model_name']} v{s['model_version']} "
      f"(promoted: {s['promoted']})")
auto = s["auto"]
tried = ", ".join(
    f"{name} {'skipped' if c['value'] is None else format(c['value'], '.4f')}"
    for name, c in auto["candidates"].items()
)
print(f"  algorithm {s['algorithm']}, the best on validation {auto['metric']} ({tried})")
for name in ("ndcg_at_10", "recall_at_10", "precision_at_10", "map_at_10"):
    print(f"  {name:<16} model {s['metrics'][name]:.4f}  popularity {s['baseline_metrics'][name]:.4f}")
print(f"  rows {s['rows']}")
PY

PORT=$($BIN/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== 3. Serve models:/affinity@champion on 127.0.0.1:$PORT"
ADMIN=demo-admin-token  # the admin RPCs (audiences, experiments) need one; reads stay open here
# Stage-aware lists on, the stages re-read every second (the default is every 5 minutes).
AFFINITY_ADMIN_TOKEN=$ADMIN $BIN/affinity serve --port "$PORT" --workers 1 --poll-seconds 5 \
    --stage-strategies default --stage-poll-seconds 1 > "$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
$BIN/affinity health --target "127.0.0.1:$PORT" --wait 60

USERS=$($BIN/python - "$DATA/interactions.parquet" <<'PY'
import sys, pandas as pd
users = pd.read_parquet(sys.argv[1], columns=["user_id"])["user_id"].value_counts()
print(" ".join(users.index[[0, len(users) // 2, len(users) - 1]]))
PY
)
echo "== 4. Recommendations"
for user in $USERS; do
    echo "-- user $user"
    $BIN/affinity recommend --target "127.0.0.1:$PORT" --user "$user" --k 5
done
echo "-- a brand-new user (cold start: popular items)"
$BIN/affinity recommend --target "127.0.0.1:$PORT" --user "new-visitor" --k 5
ITEM=$($BIN/python -c "import pandas as pd; print(pd.read_parquet('$DATA/items.parquet')['item_id'].iloc[0])")
echo "-- a new user who just viewed $ITEM (fold-in)"
$BIN/affinity recommend --target "127.0.0.1:$PORT" --user "new-visitor" --recent "$ITEM" --k 5
echo "-- more like $ITEM"
$BIN/affinity similar --target "127.0.0.1:$PORT" --item "$ITEM" --k 5
echo "-- trending products"
$BIN/affinity popular --target "127.0.0.1:$PORT" --item-type product --trending --k 5
$BIN/affinity model-info --target "127.0.0.1:$PORT"

echo "== 5. What a user does next changes their list (LogEvents, live fold-in)"
USER1=${USERS%% *}
$BIN/affinity recommend --target "127.0.0.1:$PORT" --user "$USER1" --k 5 --json > "$DATA/before.json"
$BIN/python - "$DATA/before.json" "$USER1" > "$DATA/events.jsonl" <<'PY'
import json, sys, uuid
answer, user = json.load(open(sys.argv[1])), sys.argv[2]
shown = [item["item_id"] for item in answer["items"]]
rec = answer["recommendation_id"]
run = uuid.uuid4().hex[:8]
events = [
    {"event_id": f"demo-{run}-1", "user_id": user, "item_id": shown[0], "event": "impression",
     "recommendation_id": rec, "shown_item_ids": shown},
    {"event_id": f"demo-{run}-2", "user_id": user, "item_id": shown[0], "event": "click",
     "recommendation_id": rec},
    {"event_id": f"demo-{run}-3", "user_id": user, "item_id": shown[0], "event": "purchase",
     "recommendation_id": rec, "price": 24.9},
    {"event_id": f"demo-{run}-4", "user_id": user, "item_id": shown[1], "event": "dislike",
     "recommendation_id": rec},
]
for event in events:
    print(json.dumps(event))
print(f"-- {user} was shown {', '.join(shown)}; bought {shown[0]}, "
      f"said 'not interested' to {shown[1]}", file=sys.stderr)
PY
$BIN/affinity events log --target "127.0.0.1:$PORT" --file "$DATA/events.jsonl"
echo "-- $USER1 right after: neither item comes back, and the list follows the purchase"
$BIN/affinity recommend --target "127.0.0.1:$PORT" --user "$USER1" --k 5

sleep 0.5  # the recorder writes answers every 0.2 s
echo "-- what each model version's answers earned (attribution by recommendation_id)"
$BIN/affinity events report --since 1d

echo "== 6. User operations: lifecycle stages and value tiers, a profile, stage-aware lists, an audience"
$BIN/affinity segments --interactions "$DATA/interactions.parquet" --items "$DATA/items.parquet" \
    --out "$DATA/segments" --quiet --json | tail -n 1 > "$DATA/segments-summary.json"
AT_RISK=$($BIN/python - "$DATA/segments-summary.json" "$DATA/segments/user_segments.parquet" <<'PY'
import json, sys, pandas as pd
s = json.load(open(sys.argv[1]))
print(f"-- {s['users']:,} users by stage: {s['stages']}", file=sys.stderr)
print(f"-- by value tier: {s['tiers']}", file=sys.stderr)
table = pd.read_parquet(sys.argv[2])
at_risk = table[table["stage"].isin(["at_risk", "dormant", "churned"])]["user_id"]
print(at_risk.iloc[0] if len(at_risk) else table["user_id"].iloc[0])
PY
)
echo "-- the profile of $USER1 (the segments plus the events logged since)"
$BIN/affinity users show "$USER1" --target "127.0.0.1:$PORT"
sleep 2  # each worker re-reads the stages every second here
echo "-- $AT_RISK, not seen for a while, gets the win-back strategy of their stage"
$BIN/affinity recommend --target "127.0.0.1:$PORT" --user "$AT_RISK" --k 5
echo "-- an audience: the 10 users most likely to engage with books who have not read any yet"
$BIN/affinity audience --target "127.0.0.1:$PORT" --admin-token "$ADMIN" --category books \
    --exclude-interacted --max-users 10 --out "$DATA/audience-books.csv"
head -n 4 "$DATA/audience-books.csv"

echo "== 7. Stop the server (SIGTERM, graceful)"
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
echo "Done. Open the MLflow UI with: $BIN/mlflow ui --backend-store-uri sqlite:///$(pwd)/mlflow.db"
