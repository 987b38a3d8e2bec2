module golang.org/x/exp
