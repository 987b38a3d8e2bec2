module github.com/BurntSushi/toml
