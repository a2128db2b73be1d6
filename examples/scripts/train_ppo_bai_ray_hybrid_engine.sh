#!/bin/bash
# PPO with the vLLM hybrid engine, the actor initialized by BAI (arXiv 2509.00309).
# Written from OpenRLHF's examples/scripts/train_ppo_ray_hybrid_engine.sh, in OpenRLHF 0.11's dotted flags;
# the only additions are --actor_init bai and the --bai.* flags.
#
# GPUs: one node with 8 GPUs of 80 GB (A100/H100) for a 7B model. Actor, reference, critic and 4 vLLM engines
# (tensor parallel 2) share the 8 GPUs (--train.colocate_all, sleep mode for vLLM and DeepSpeed).
# The reward is rule-based (OpenRLHF's examples/python/math_reward_func.py), so no reward model is loaded and the
# critic defaults to the actor path: it starts from the BAI checkpoint too.
#
# Start Ray first (`ray start --head --num-gpus 8`). The merge runs once, on the node that runs this script, into
# $OPENRLHF_BAI_CACHE/merged (default ~/.cache/openrlhf-bai/merged); on several nodes that directory must be on a shared
# filesystem, or add --bai.materialize per_node. A repeat run reuses the merge.
# Extra arguments go to the launcher, e.g. --bai.merge_only to merge and print the OpenRLHF command.

set -euo pipefail

BASE=${BASE:-Qwen/Qwen2.5-Math-7B}                                # pretrained base
SFT_INSTRUCT=${SFT_INSTRUCT:-Qwen/Qwen2.5-Math-7B-Instruct}       # instruction SFT of it
SFT_REASONING=${SFT_REASONING:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}  # distilled reasoning SFT of it
ALPHA=${ALPHA:-0.5}
REWARD_FUNC=${REWARD_FUNC:-/openrlhf/examples/python/math_reward_func.py}
DATASET=${DATASET:-zhuzilin/dapo-math-17k}
SAVE_PATH=${SAVE_PATH:-$PWD/exp/ppo-bai}
# `ray job submit` runs the launcher as the job's driver; LAUNCH="" runs it here, on a node of the cluster.
LAUNCH=${LAUNCH-ray job submit --address=http://127.0.0.1:8265 --}
PYTHON=${PYTHON:-python3}

set -x
$LAUNCH $PYTHON -m openrlhf_bai.cli.train_ppo_ray \
   --actor_init bai \
   --bai.base "$BASE" \
   --bai.sft "$SFT_INSTRUCT" "$SFT_REASONING" \
   --bai.alpha "$ALPHA" \
   --bai.on_collapse save \
   --actor.model_name_or_path "$SFT_REASONING" \
   --reward.remote_url "$REWARD_FUNC" \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --critic.num_nodes 1 \
   --critic.num_gpus_per_node 8 \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --vllm.num_engines 4 \
   --vllm.tensor_parallel_size 2 \
   --train.colocate_all \
   --vllm.gpu_memory_utilization 0.5 \
   --vllm.enable_sleep \
   --ds.enable_sleep \
   --vllm.sync_backend nccl \
   --vllm.enforce_eager \
   --ckpt.output_dir "$SAVE_PATH/final" \
   --ckpt.path "$SAVE_PATH/ckpt" \
   --ckpt.save_hf \
   --ckpt.save_steps 20 \
   --ckpt.max_num 3 \
   --train.batch_size 128 \
   --train.micro_batch_size 2 \
   --rollout.batch_size 128 \
   --rollout.micro_batch_size 8 \
   --rollout.n_samples_per_prompt 4 \
   --train.max_epochs 1 \
   --data.max_len 9216 \
   --rollout.max_new_tokens 8192 \
   --data.max_samples 100000 \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --actor.adam.lr 5e-7 \
   --critic.adam.lr 9e-6 \
   --algo.kl.init_coef 0.001 \
   --data.prompt_dataset "$DATASET" \
   --data.input_key prompt \
   --data.label_key label \
   --data.apply_chat_template \
   --actor.gradient_checkpointing_enable \
   --ds.packing_samples \
   --train.dynamic_batch_enable \
   --train.max_tokens_per_gpu 16384 \
   --logger.tensorboard_dir "$SAVE_PATH/runs" \
   --logger.logging_steps 1 \
   "$@"
