/** The tests drive edu with the same small driver the examples use. */
export * from "../../examples/edu.ts";
