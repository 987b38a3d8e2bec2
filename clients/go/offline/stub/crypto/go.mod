module golang.org/x/crypto
