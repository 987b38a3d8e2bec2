module github.com/kr/pretty
