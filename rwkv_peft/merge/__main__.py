"""``python -m rwkv_peft.merge``: see rwkv_peft.merge.cli."""

from rwkv_peft.merge.cli import main

main()
