// A Go environment: registers with a Clotho gateway, generates each group through the
// gateway, scores the samples (a toy score: the share of even token ids) and submits
// the scored groups.
//
//	go run ./examples/environment -target 127.0.0.1:50051 -groups 4 -group-size 4
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/clotho/clotho/clients/go/clotho"
	clothov1 "github.com/clotho/clotho/clients/go/gen/clotho/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the gateway's gRPC address")
	token := flag.String("token", os.Getenv("CLOTHO_TRAJECTORY_TOKEN"), "the gateway's trajectory token")
	inferenceToken := flag.String("inference-token", os.Getenv("CLOTHO_INFERENCE_TOKEN"), "the gateway's inference token (Generate)")
	groups := flag.Int("groups", 4, "groups to submit")
	groupSize := flag.Uint("group-size", 4, "samples per group")
	maxNew := flag.Uint("max-new-tokens", 8, "tokens to generate per sample")
	asJSON := flag.Bool("json", false, "also print each submitted group (protobuf JSON)")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	client, err := clotho.Dial(ctx, *target, append(clotho.BearerToken(*token), grpc.WithInsecure())...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// Generate is guarded by the inference token: a second connection carries it.
	generator := client
	if *inferenceToken != "" && *inferenceToken != *token {
		if generator, err = clotho.Dial(ctx, *target, append(clotho.BearerToken(*inferenceToken), grpc.WithInsecure())...); err != nil {
			log.Fatal(err)
		}
		defer generator.Close()
	}

	register := &clothov1.RegisterEnvRequest{DesiredName: "go-env", MaxTokenLength: 512, Weight: 1, GroupSize: uint32(*groupSize)}
	env, err := client.RegisterEnv(ctx, register)
	for err == nil && env.GetStatus() != "success" { // until a trainer asked for a batch
		time.Sleep(200 * time.Millisecond)
		env, err = client.RegisterEnv(ctx, register)
	}
	if err != nil {
		log.Fatalf("%v (code %v)", err, clotho.Code(err))
	}
	fmt.Fprintf(os.Stderr, "registered as %s (env %d)\n", env.GetWandbName(), env.GetEnvId())

	n, maxNewTokens, temperature := uint32(*groupSize), uint32(*maxNew), float32(1)
	for g := 0; g < *groups; g++ {
		prompt := []int32{1, int32(10 + g), int32(20 + g)}
		completions, err := generator.Generate(ctx, &clothov1.GenerateRequest{
			InputIds:       prompt,
			SamplingParams: &clothov1.SamplingParams{N: &n, MaxNewTokens: &maxNewTokens, Temperature: &temperature},
		})
		if err != nil {
			log.Fatalf("%v (code %v)", err, clotho.Code(err))
		}
		envID := env.GetEnvId()
		group := &clothov1.ScoredGroup{EnvId: &envID}
		for _, c := range completions {
			seq := &clothov1.ScoredSequence{}
			even := 0
			for _, p := range prompt {
				seq.Tokens = append(seq.Tokens, p)
				seq.Masks = append(seq.Masks, -100)
				seq.InferenceLogprobs = append(seq.InferenceLogprobs, 1)
			}
			for i, t := range c.GetOutputIds() {
				seq.Tokens = append(seq.Tokens, t)
				seq.Masks = append(seq.Masks, t)
				seq.InferenceLogprobs = append(seq.InferenceLogprobs, c.GetOutputLogprobs()[i])
				if t%2 == 0 {
					even++
				}
			}
			seq.Score = float64(even) / float64(len(c.GetOutputIds())+1)
			group.Sequences = append(group.Sequences, seq)
		}
		answer, err := client.Submit(ctx, []*clothov1.ScoredGroup{group})
		if err != nil {
			log.Fatalf("%v (code %v)", err, clotho.Code(err))
		}
		line := fmt.Sprintf(`{"group": %d, "received": %d, "buffered": %d`, g, answer.GetReceived(), answer.GetBuffered())
		if *asJSON {
			submitted, err := protojson.Marshal(group)
			if err != nil {
				log.Fatal(err)
			}
			line += `, "submitted": ` + string(submitted)
		}
		fmt.Println(line + "}")
	}
}
