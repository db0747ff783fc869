"""Names of everything that crosses the bank boundary or lives in a bank's state.

Records (FedAvg's defaults): the model travels as ``ARRAYS``, settings as ``CONFIG``,
replies carry one MetricRecord ``METRICS``. Metric keys are kebab-case like Flower's.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SCALER = "scaler"  # ArrayRecord in the bank's own context.state: [mean, scale]

# Config sent to banks
SERVER_ROUND = "server-round"  # set by FedAvg itself
EVALUATE_INCOMING = "evaluate-incoming"  # train replies also evaluate the incoming model

# Metrics a bank replies with (counts and aggregates only, never rows or row scores)
NUM_EXAMPLES = "num-examples"  # samples, not batches: FedAvg's weights by default
VOTE = "vote"  # always 1: FedAvg's weights when every bank counts equally
BANK_ID = "bank-id"
N_TRAIN = "n-train"
N_VAL = "n-val"
N_FRAUD = "n-fraud"
TRAIN_LOSS = "train-loss"
LOSS = "loss"
TP, FP, FN, TN = "tp", "fp", "fn", "tn"
HIST_LEGIT = "hist-legit"  # per-bin counts of legit rows' scores (metrics.SCORE_EDGES)
HIST_FRAUD = "hist-fraud"

# Aggregated over the banks of one round (server side)
BANK_IDS = "bank-ids"
COUNT_KEYS = (TP, FP, FN, TN)
HIST_KEYS = (HIST_LEGIT, HIST_FRAUD)
SIZE_KEYS = (N_TRAIN, N_VAL, N_FRAUD)
