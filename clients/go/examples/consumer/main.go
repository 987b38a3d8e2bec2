// A trainer-side consumer: registers as the trainer, streams batches from a Clotho
// gateway with credit-based flow control, and prints what it gets.
//
//	go run ./examples/consumer -target 127.0.0.1:50051 -token "$TOKEN" -batches 3
//
// With -json each batch is printed as one line of protobuf JSON (tokens, masks,
// logprobs, policy versions), for other programs to read.
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
	"google.golang.org/protobuf/proto"

	"github.com/clotho/clotho/clients/go/clotho"
	clothov1 "github.com/clotho/clotho/clients/go/gen/clotho/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the gateway's gRPC address")
	token := flag.String("token", os.Getenv("CLOTHO_TRAJECTORY_TOKEN"), "the gateway's trajectory token")
	batchSize := flag.Uint("batch-size", 4, "sequences per batch (registered as the trainer's)")
	batches := flag.Int("batches", 3, "stop after this many batches")
	ahead := flag.Uint("ahead", 2, "batches the gateway may send ahead of consumption (credits)")
	asJSON := flag.Bool("json", false, "print each batch as one line of protobuf JSON")
	quiet := flag.Bool("quiet", false, "print only a summary: batches, bytes, seconds from the first batch to the last")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up after this long")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	opts := append(clotho.BearerToken(*token), grpc.WithInsecure())
	client, err := clotho.Dial(ctx, *target, opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	id, err := client.RegisterTrainer(ctx, &clothov1.RegisterTrainerRequest{
		BatchSize: uint32(*batchSize), MaxTokenLen: 2048, NumSteps: uint64(*batches),
	})
	if err != nil {
		log.Fatalf("%v (code %v)", err, clotho.Code(err))
	}
	fmt.Fprintf(os.Stderr, "registered trainer %s\n", id)

	stream, err := client.Batches(ctx, uint32(*ahead))
	if err != nil {
		log.Fatal(err)
	}
	defer stream.Close()
	var first time.Time
	size := 0
	for i := 0; i < *batches; i++ {
		batch, err := stream.Next()
		if err != nil {
			log.Fatalf("%v (code %v)", err, clotho.Code(err))
		}
		if i == 0 {
			first = time.Now()
		}
		if *quiet {
			size += proto.Size(batch)
			continue
		}
		if *asJSON {
			line, err := protojson.Marshal(batch)
			if err != nil {
				log.Fatal(err)
			}
			fmt.Println(string(line))
			continue
		}
		fmt.Printf("step %d: %d groups\n", batch.GetStep(), len(batch.GetGroups()))
		for g, group := range batch.GetGroups() {
			for s, seq := range group.GetSequences() {
				fmt.Printf("  group %d seq %d: %d tokens, score %.3f, policy version %d\n",
					g, s, len(seq.GetTokens()), seq.GetScore(), seq.GetPolicyVersion())
			}
		}
	}
	if *quiet {
		fmt.Printf("{\"batches\": %d, \"bytes\": %d, \"seconds\": %f}\n", *batches, size, time.Since(first).Seconds())
	}
}
