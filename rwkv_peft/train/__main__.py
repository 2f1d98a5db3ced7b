"""python -m rwkv_peft.train --load_model BASE.pth --data_file DATA --proj_dir OUT --peft miss ..."""

from rwkv_peft.train.recipe import main

if __name__ == "__main__":
    main()
