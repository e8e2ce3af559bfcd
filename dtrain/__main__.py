from dtrain.cli import main

if __name__ == "__main__":  # the guard also keeps spawn-based async checkpointing safe
    main()
