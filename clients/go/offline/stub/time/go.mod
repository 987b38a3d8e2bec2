module golang.org/x/time
