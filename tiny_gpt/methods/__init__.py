"""The other parameter-efficient methods that lesson 10 compares with LoRA and QLoRA.

    adapter_tuning.py  bottleneck adapters after attention and MLP (Houlsby et al. 2019)
    prefix_tuning.py   learned keys and values that every position attends to (Li & Liang 2021)
"""
