"""Names of everything that crosses the bank boundary or lives in a bank's state.

Records (FedAvg's defaults): the model travels as ``ARRAYS``, settings as ``CONFIG``,
replies carry one MetricRecord ``METRICS``. Metric keys are kebab-case like Flower's.
"""

ARRAYS = "arrays"
# The model's weights inside ARRAYS: one float vector in the order of FraudNet's
# state_dict (common/model.py: packed/unpacked). Flower sends every Array as two
# objects, each by its own call at each hop (ServerApp -> SuperLink -> SuperNode -> task,
# a reply the same way back); one vector instead of six named tensors takes a message
# from 17 objects to 7, and about halved the SuperNodes' and the SuperLink's CPU a
# round (README, "Real processes").
WEIGHTS = "weights"
CONFIG = "config"
METRICS = "metrics"
SCALER = "scaler"  # ArrayRecord in the bank's own context.state: [mean, scale]

# Config sent to banks
SERVER_ROUND = "server-round"  # set by FedAvg itself
EVALUATE_INCOMING = "evaluate-incoming"  # train replies also evaluate the incoming model
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx: the bank adds the proximal term

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
DP_EPSILON = "dp-epsilon"  # epsilon the bank has spent so far (DP runs only)
DP_NOISE = "dp-noise"  # its DP-SGD noise multiplier
# Membership audit of the final model: per-bin counts of -log(loss) of the bank's
# training rows (members) and of its validation rows (non-members), on SCORE_EDGES.
HIST_MEMBER = "hist-member"
HIST_NONMEMBER = "hist-nonmember"
# Personalization (final evaluate only): the bank's fine-tuned model on its validation
# rows, and whether the bank keeps it (1) or the federated model (0).
HIST_LEGIT_PERSONAL = "hist-legit-personal"
HIST_FRAUD_PERSONAL = "hist-fraud-personal"
PERSONAL_KEPT = "personal-kept"

# Aggregated over the banks of one round (server side)
BANK_IDS = "bank-ids"
EVALUATED_IDS = "evaluated-bank-ids"  # the banks whose validation histograms are summed
COUNT_KEYS = (TP, FP, FN, TN)
HIST_KEYS = (HIST_LEGIT, HIST_FRAUD, HIST_MEMBER, HIST_NONMEMBER, HIST_LEGIT_PERSONAL,
             HIST_FRAUD_PERSONAL)
SIZE_KEYS = (N_TRAIN, N_VAL, N_FRAUD)
# What a bank says about its personalized copy of the final model (client/bank.py).
PERSONAL_KEYS = (HIST_LEGIT_PERSONAL, HIST_FRAUD_PERSONAL, PERSONAL_KEPT)
PER_BANK_KEYS = (DP_EPSILON, DP_NOISE, PERSONAL_KEPT)  # listed per bank, like the sizes
# Every metric a bank's reply may carry (the server refuses a reply with any other).
REPLY_KEYS = frozenset({NUM_EXAMPLES, VOTE, BANK_ID, *SIZE_KEYS, TRAIN_LOSS, LOSS,
                        *COUNT_KEYS, *HIST_KEYS, DP_EPSILON, DP_NOISE, PERSONAL_KEPT})
