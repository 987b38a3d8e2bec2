// Used only where the Go module proxy is unreachable (this project's machines):
// the same module and requirements as ../go.mod, with every module resolved from
// Debian's packages (/usr/share/gocode/src) or, for modules that appear in the
// module graph but are never imported, from an empty stand-in under ./offline/stub.
//   GOFLAGS=-mod=mod GOPROXY=off go test -modfile=offline/go.debian.mod ./...
module github.com/clotho/clotho/clients/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)

require (
	github.com/golang/protobuf v1.5.2 // indirect
	golang.org/x/net v0.3.0 // indirect
	golang.org/x/sys v0.5.0 // indirect
	golang.org/x/text v0.7.0 // indirect
	google.golang.org/genproto v0.0.0-20200526211855-cb27e3aa2013 // indirect
)

replace github.com/golang/protobuf => /usr/share/gocode/src/github.com/golang/protobuf

replace github.com/google/go-cmp => /usr/share/gocode/src/github.com/google/go-cmp

replace golang.org/x/net => /usr/share/gocode/src/golang.org/x/net

replace golang.org/x/oauth2 => /usr/share/gocode/src/golang.org/x/oauth2

replace golang.org/x/sys => /usr/share/gocode/src/golang.org/x/sys

replace golang.org/x/text => /usr/share/gocode/src/golang.org/x/text

replace google.golang.org/genproto => /usr/share/gocode/src/google.golang.org/genproto

replace google.golang.org/grpc => /usr/share/gocode/src/google.golang.org/grpc

replace google.golang.org/protobuf => /usr/share/gocode/src/google.golang.org/protobuf

replace github.com/cncf/udpa/go => ./offline/stub/udpa

replace github.com/envoyproxy/go-control-plane => ./offline/stub/go-control-plane

replace github.com/golang/glog => ./offline/stub/glog

replace github.com/google/uuid => ./offline/stub/uuid

replace golang.org/x/term => ./offline/stub/term

replace cloud.google.com/go/compute/metadata => ./offline/stub/metadata

replace cloud.google.com/go => ./offline/stub/cloud-go

replace google.golang.org/appengine => ./offline/stub/appengine

replace golang.org/x/lint => ./offline/stub/lint

replace golang.org/x/tools => ./offline/stub/tools

replace honnef.co/go/tools => ./offline/stub/honnef-tools

replace golang.org/x/mod => ./offline/stub/mod

replace golang.org/x/crypto => ./offline/stub/crypto

replace golang.org/x/xerrors => ./offline/stub/xerrors

replace golang.org/x/sync => ./offline/stub/sync

replace github.com/client9/misspell => ./offline/stub/misspell

replace github.com/BurntSushi/toml => ./offline/stub/toml

replace golang.org/x/exp => ./offline/stub/exp

replace github.com/census-instrumentation/opencensus-proto => ./offline/stub/opencensus-proto

replace github.com/envoyproxy/protoc-gen-validate => ./offline/stub/protoc-gen-validate

replace github.com/prometheus/client_model => ./offline/stub/client_model

replace cloud.google.com/go/compute => ./offline/stub/compute

replace github.com/kr/pretty => ./offline/stub/kr-pretty

replace golang.org/x/time => ./offline/stub/time

replace github.com/google/martian => ./offline/stub/martian

replace github.com/googleapis/gax-go/v2 => ./offline/stub/gax-go

replace go.opencensus.io => ./offline/stub/opencensus

replace google.golang.org/api => ./offline/stub/api
