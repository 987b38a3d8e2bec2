package clotho

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// BearerToken returns the dial options that send `authorization: Bearer <token>` on
// every call of the connection, unary and streaming (the gateway's trajectory token,
// or its inference token for Generate). They work on insecure connections, where
// per-RPC credentials are refused. An empty token adds nothing:
//
//	opts := append(clotho.BearerToken(token), grpc.WithInsecure())
//	c, err := clotho.Dial(ctx, target, opts...)
func BearerToken(token string) []grpc.DialOption {
	if token == "" {
		return nil
	}
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(
			func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(withMetadata(ctx, "authorization", "Bearer "+token), method, req, reply, cc, opts...)
			},
		),
		grpc.WithChainStreamInterceptor(
			func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withMetadata(ctx, "authorization", "Bearer "+token), desc, cc, method, opts...)
			},
		),
	}
}

// withMetadata is ctx with outgoing metadata key set to value (replacing earlier values).
func withMetadata(ctx context.Context, key, value string) context.Context {
	md, _ := metadata.FromOutgoingContext(ctx)
	md = md.Copy()
	md.Set(key, value)
	return metadata.NewOutgoingContext(ctx, md)
}

type traceKey struct{}

// TraceContext is a W3C trace context (https://www.w3.org/TR/trace-context/).
type TraceContext struct {
	// Traceparent is "00-<trace id>-<parent span id>-<flags>".
	Traceparent string
	// Tracestate is vendor state, possibly empty.
	Tracestate string
}

// WithTraceContext returns ctx carrying tc: every call made with it sends the
// `traceparent` (and `tracestate`) metadata, so the gateway's spans, and the
// inference service's behind it, join the caller's trace. Callers using an
// OpenTelemetry SDK can fill it from their propagator.
func WithTraceContext(ctx context.Context, tc TraceContext) context.Context {
	return context.WithValue(ctx, traceKey{}, tc)
}

func withTrace(ctx context.Context) context.Context {
	tc, ok := ctx.Value(traceKey{}).(TraceContext)
	if !ok || tc.Traceparent == "" {
		return ctx
	}
	ctx = withMetadata(ctx, "traceparent", tc.Traceparent)
	if tc.Tracestate != "" {
		ctx = withMetadata(ctx, "tracestate", tc.Tracestate)
	}
	return ctx
}

// TraceContextOptions are the interceptors that send the context's TraceContext on
// every call (Dial installs them).
func TraceContextOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(
			func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(withTrace(ctx), method, req, reply, cc, opts...)
			},
		),
		grpc.WithChainStreamInterceptor(
			func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withTrace(ctx), desc, cc, method, opts...)
			},
		),
	}
}
