"""What SLURM's step daemon (slurmstepd) does on one node of an `srun` step, for the tests on a
machine without SLURM: start this node's tasks of the step, each with the environment srun gives
a task (its SLURM_PROCID, SLURM_LOCALID, the step's tasks and nodes; no RANK: no launcher), relay
SIGTERM to them, and exit with the highest exit status among them.

    python tests/srun_step.py JOB_ID NODE_ID TASKS_PER_NODE NODELIST -- COMMAND...

TASKS_PER_NODE as SLURM writes it for the step ("2,1": two tasks on node 0, one on node 1).
"""

import os
import signal
import subprocess
import sys

job, node, tasks_per_node, nodelist = sys.argv[1:5]
command = sys.argv[sys.argv.index("--") + 1:]
counts = [int(n) for n in tasks_per_node.split(",")]
first = sum(counts[:int(node)])
ranks = range(first, first + counts[int(node)])
base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
base.update({"SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_NODEID": node, "SLURM_STEP_NUM_TASKS": str(sum(counts)),
             "SLURM_NTASKS": str(sum(counts)), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
             "SLURM_STEP_NODELIST": nodelist, "SLURM_GTIDS": ",".join(map(str, ranks))})
tasks = [subprocess.Popen(command, env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local)})
         for local, rank in enumerate(ranks)]
signal.signal(signal.SIGTERM, lambda *_: [task.send_signal(signal.SIGTERM) for task in tasks])
codes = [task.wait() for task in tasks]
sys.exit(max(code if code >= 0 else 128 - code for code in codes))
